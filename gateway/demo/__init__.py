"""Real server parts (Dovecot upstream, SMTP sink) for tests and demos."""
