"""Connection limits: total sessions and sessions per account."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ConnectionLimits:
    max_total: int
    max_per_user: int
    total: int = 0
    per_user: dict[str, int] = field(default_factory=dict)

    def open(self) -> bool:
        """Count a new connection; False if the total limit is reached."""
        if self.total >= self.max_total:
            return False
        self.total += 1
        return True

    def close(self) -> None:
        self.total = max(0, self.total - 1)

    def login(self, account: str) -> bool:
        """Count a logged-in session of ``account``; False if over its limit."""
        n = self.per_user.get(account, 0)
        if n >= self.max_per_user:
            return False
        self.per_user[account] = n + 1
        return True

    def logout(self, account: str) -> None:
        n = self.per_user.get(account, 0) - 1
        if n > 0:
            self.per_user[account] = n
        else:
            self.per_user.pop(account, None)
