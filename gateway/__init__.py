"""Mailgate: the mail core (SMTP submission, policy, queue, relay, IMAP proxy) and its areas."""
