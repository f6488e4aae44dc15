"""SMTP submission: aiosmtpd servers on 587 (STARTTLS) and 465 (implicit TLS)."""
