"""Errors the backend answers with, and the bodies it sends for them."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An HTTP error with a message meant for the client and a metrics reason.

    A 422 carries the offending `field` so its body has the same shape as a pydantic one.
    """

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        reason: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of the response."""
        if self.field is None:
            return {"detail": self.detail}
        loc: list[str] = self.field.split(".")
        return {
            "detail": [
                {
                    "loc": loc,
                    "field": self.field,
                    "msg": self.detail,
                    "type": "value_error",
                    "received_type": None,
                }
            ]
        }

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        """The error as a response."""
        return JSONResponse(
            self.body(), status_code=self.status, headers={**self.headers, **(headers or {})}
        )


class BodyTooLargeError(Exception):
    """The request body passed the configured limit while it was streamed in."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit
