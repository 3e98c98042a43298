"""The one error type of the API: an HTTP status and a one-line message that names the fix."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = f"{message} — {fix}" if fix else message

    def body(self) -> dict[str, object]:
        """E2B's error shape ({code, message}), which its SDKs turn into their exceptions."""
        return {"code": self.status, "message": self.message}
