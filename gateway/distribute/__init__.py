"""Shared-mailbox distribution (邮件分发): watch sales@, route each inquiry once."""
