"""Runware wire models: the single source of truth for what crosses the HTTP boundary.

Shared by `client` (what we send, what we read) and `sandbox` (what it accepts,
what it answers). Python names are snake_case; the JSON spelling is camelCase (with
Runware's own capitals for ``taskUUID``, ``imageURL``, ``NSFWContent`` ...). Requests
are strict and forbid unknown keys; responses ignore unknown keys so a new field on the
real API never breaks a run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal
from functools import cached_property
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.types import UUID4
from pydantic_core import PydanticCustomError

MODEL_AIR: Final = "ideogram:3@2"
"""The seed page's model: Ideogram 2.0 Remix on Runware."""

DEFAULT_PRICE_USD: Final = Decimal("0.08")
"""Every example on the seed page reports this cost per image."""

# ---------------------------------------------------------------------------
# Allowed sizes. The seed lists a fixed set, not "any multiple of 64". The five
# documented portrait sizes are the last five landscape sizes transposed, so we accept
# every landscape size in both orientations plus the square (runware-protocol.md §4).
_LANDSCAPE: Final[tuple[tuple[int, int], ...]] = (
    (1536, 512), (1536, 576), (1536, 640),
    (1472, 576), (1472, 640), (1472, 704),
    (1408, 576), (1408, 640), (1408, 704),
    (1344, 640), (1344, 704), (1344, 768),
    (1312, 736),
    (1280, 704), (1280, 720), (1280, 768),
    (1248, 832),
    (1232, 768),
    (1216, 704), (1216, 768), (1216, 832),
    (1152, 704), (1152, 832), (1152, 864), (1152, 896),
    (1120, 896),
    (1088, 768), (1088, 832), (1088, 896), (1088, 960),
    (1024, 640), (1024, 832), (1024, 896), (1024, 960),
    (960, 832), (960, 896),
)  # fmt: skip
ALLOWED_SIZES: Final[frozenset[tuple[int, int]]] = frozenset(
    {(1024, 1024)} | set(_LANDSCAPE) | {(h, w) for w, h in _LANDSCAPE}
)

SIZE_NOT_ALLOWED: Final = "size_not_allowed"
"""Error type of the one request check that spans two fields (width x height)."""
CROSS_FIELD_CHECKS: Final[Mapping[str, tuple[str, ...]]] = {
    SIZE_NOT_ALLOWED: ("width", "height"),
}
"""Error type of each model-level request check -> the wire fields it concerns.

Such an error has no location of its own (it belongs to no single field); this is how
a reader (manifest validation) names its fields without parsing the message.
"""

ModelAir = Literal["ideogram:3@2"]
"""The one model the request accepts (`MODEL_AIR`)."""
OutputType = Literal["URL", "dataURI", "base64Data"]
OutputFormat = Literal["JPG", "PNG", "WEBP"]
DeliveryMethod = Literal["sync", "async"]
SafetyMode = Literal["none", "fast"]
MagicPrompt = Literal["AUTO", "ON", "OFF"]
RenderingSpeed = Literal["TURBO", "DEFAULT", "QUALITY"]
# The seed gives only counts and descriptions for these enums; the spellings are
# Ideogram's own API names, as Runware's older reference lists them (protocol §4).
StyleType = Literal[
    "AUTO", "GENERAL", "REALISTIC", "DESIGN", "RENDER_3D", "ANIME", "FICTION"
]
PaletteName = Literal[
    "EMBER", "FRESH", "JUNGLE", "MAGIC", "MELON", "MOSAIC", "PASTEL", "ULTRAMARINE"
]

RESULT_KEYS: Final[dict[str, str]] = {
    "URL": "imageURL",
    "dataURI": "imageDataURI",
    "base64Data": "imageBase64Data",
}
"""Which key of a result item carries the image, by outputType."""

_HEX = re.compile(r"^#[0-9A-Fa-f]{6}$")
_UUID = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_BASE64 = re.compile(r"^[A-Za-z0-9+/\r\n]+={0,2}$")


def image_ref_kind(value: str) -> Literal["uuid", "url", "data_uri", "base64"] | None:
    """Classify an image reference the API accepts, or None when it is none of them."""
    if _UUID.match(value):
        return "uuid"
    if value.startswith(("http://", "https://")):
        return "url"
    if value.startswith("data:image/") and ";base64," in value:
        return "data_uri"
    if len(value) >= 16 and _BASE64.match(value):
        return "base64"
    return None


def _check_image_ref(value: str) -> str:
    if image_ref_kind(value) is None:
        raise ValueError(
            "must be an image UUID, an http(s) URL, a data URI or base64 data"
        )
    return value


def _check_uri(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http(s) URI")
    return value


ImageRef = Annotated[str, Field(min_length=1)]
Uri = Annotated[str, Field(min_length=8, max_length=4096)]
Money = Annotated[
    Decimal, PlainSerializer(lambda d: float(d), return_type=float, when_used="json")
]
"""USD as an exact Decimal in Python; a JSON number on the wire, as the API sends it."""


class RequestModel(BaseModel):
    """What we send (and the sandbox receives): strict, unknown keys forbidden."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        frozen=True,
        extra="forbid",
        strict=True,
        use_attribute_docstrings=True,
    )


class ResponseModel(BaseModel):
    """What we receive: tolerant of fields the real API may add."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        frozen=True,
        extra="ignore",
        use_attribute_docstrings=True,
    )


# ---------------------------------------------------------------------------
# Requests


class PaletteMember(RequestModel):
    color_hex: str
    """A colour as #RRGGBB."""
    color_weight: Annotated[float, Field(ge=0.05, le=1.0)] | None = None
    """Influence of this colour, 0.05-1.0 in steps of 0.01."""

    @field_validator("color_hex")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _HEX.match(value):
            raise ValueError("must be a hex colour like #FF5733")
        return value

    @field_validator("color_weight")
    @classmethod
    def _step(cls, value: float | None) -> float | None:
        if value is not None and not math.isclose(
            value * 100, round(value * 100), abs_tol=1e-6
        ):
            raise ValueError("must be a multiple of 0.01")
        return value


class ColorPalette(RequestModel):
    """A preset ``name`` or custom ``members``: exactly one of the two."""

    name: PaletteName | None = None
    members: Annotated[list[PaletteMember], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ColorPalette:
        if (self.name is None) == (self.members is None):
            raise ValueError("give exactly one of 'name' or 'members'")
        return self


class IdeogramSettings(RequestModel):
    color_palette: ColorPalette | None = None
    magic_prompt: MagicPrompt | None = None
    """Prompt enhancement; the API default is AUTO."""
    remix_strength: Annotated[int, Field(ge=1, le=100)] | None = None
    """How far the output departs from the reference; the API default is 50."""
    rendering_speed: RenderingSpeed | None = None
    """Speed/quality trade-off; the API default is DEFAULT."""
    style_reference_images: (
        Annotated[list[ImageRef], Field(min_length=1, max_length=4)] | None
    ) = None
    style_type: StyleType | None = None
    """The API default is AUTO."""

    @field_validator("style_reference_images")
    @classmethod
    def _refs(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for item in value:
                _check_image_ref(item)
        return value


class ProviderSettings(RequestModel):
    ideogram: IdeogramSettings


class Safety(RequestModel):
    check_content: bool | None = None
    """Turning this on switches mode to 'fast'."""
    mode: SafetyMode | None = None


class Inputs(RequestModel):
    reference_images: Annotated[list[ImageRef], Field(min_length=1, max_length=1)]
    """Exactly one reference image: UUID, URL, data URI or base64."""

    @field_validator("reference_images")
    @classmethod
    def _refs(cls, value: list[str]) -> list[str]:
        for item in value:
            _check_image_ref(item)
        return value


class ImageInferenceRequest(RequestModel):
    """One Ideogram Remix task, every parameter of the seed page.

    Optional parameters default to None and are left out of the JSON, so the API's own
    defaults apply (those are named in each field's docstring).
    """

    task_type: Literal["imageInference"] = "imageInference"
    task_uuid: UUID4 = Field(alias="taskUUID")
    model: ModelAir = MODEL_AIR
    positive_prompt: Annotated[str, Field(min_length=1, max_length=2000)]
    negative_prompt: Annotated[str, Field(min_length=1, max_length=2000)] | None = None
    width: int
    height: int
    inputs: Inputs
    output_type: OutputType | None = None
    """The API default is URL."""
    output_format: OutputFormat | None = None
    """The API default is JPG."""
    output_quality: Annotated[int, Field(ge=20, le=99)] | None = None
    """The API default is 95."""
    webhook_url: Uri | None = Field(default=None, alias="webhookURL")
    delivery_method: DeliveryMethod | None = None
    """The API default is sync; remix always sends async."""
    upload_endpoint: Uri | None = None
    safety: Safety | None = None
    ttl: Annotated[int, Field(ge=60)] | None = None
    """Seconds a result URL lives; only with outputType URL."""
    include_cost: bool | None = None
    number_results: Annotated[int, Field(ge=1, le=20)] | None = None
    """Images per task, each with its own seed; the API default is 1."""
    provider_settings: ProviderSettings | None = None

    @field_validator("webhook_url", "upload_endpoint")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return None if value is None else _check_uri(value)

    @field_validator("ttl")
    @classmethod
    def _ttl_needs_url(cls, value: int | None, info: ValidationInfo) -> int | None:
        # outputType is declared before ttl, so it is in info.data once it is valid
        # (an invalid outputType is reported on its own and skips this check).
        output_type = info.data.get("output_type")
        if value is not None and output_type not in (None, "URL"):
            raise ValueError("ttl applies only when outputType is URL")
        return value

    @model_validator(mode="after")
    def _size(self) -> ImageInferenceRequest:
        if (self.width, self.height) not in ALLOWED_SIZES:
            raise PydanticCustomError(
                SIZE_NOT_ALLOWED,
                "width x height {width}x{height} is not a size Ideogram Remix "
                "supports (e.g. 1024x1024, 1344x768, 768x1344)",
                {"width": self.width, "height": self.height},
            )
        return self

    @property
    def images(self) -> int:
        """How many images this task produces."""
        return self.number_results or 1

    @cached_property
    def wire(self) -> dict[str, Any]:
        """The JSON object for this task, leaving unset parameters to the API.

        Computed once (the engine keeps it for the sidecar, the client sends it);
        treat it as read-only.
        """
        return self.model_dump(mode="json", exclude_none=True)

    def to_wire(self) -> dict[str, Any]:
        """A fresh copy of :attr:`wire` that the caller may change."""
        return self.model_dump(mode="json", exclude_none=True)


class GetResponseRequest(RequestModel):
    task_type: Literal["getResponse"] = "getResponse"
    task_uuid: UUID4 = Field(alias="taskUUID")


class ImageUploadRequest(RequestModel):
    task_type: Literal["imageUpload"] = "imageUpload"
    task_uuid: UUID4 = Field(alias="taskUUID")
    image: ImageRef
    """A data URI, base64 data or URL of a PNG, JPG or WEBP image."""


class AuthenticationRequest(RequestModel):
    task_type: Literal["authentication"] = "authentication"
    api_key: str = Field(repr=False)
    """Kept out of repr so the key never reaches a log line."""


AnyRequest = Annotated[
    ImageInferenceRequest
    | GetResponseRequest
    | ImageUploadRequest
    | AuthenticationRequest,
    Field(discriminator="task_type"),
]
REQUEST_ADAPTER: Final = TypeAdapter(AnyRequest)
"""Parses one task object of a request array (used by the sandbox)."""


# ---------------------------------------------------------------------------
# Responses


class ImageResult(ResponseModel):
    """A finished image (a sync result, or a poll item with status success).

    ``task_type`` is any string: poll answers echo "imageInference" or say
    "getResponse", depending on the server (runware-protocol.md §10).
    """

    task_type: str | None = None
    task_uuid: str = Field(alias="taskUUID")
    image_uuid: str = Field(alias="imageUUID")
    status: Literal["success"] | None = None
    image_url: str | None = Field(default=None, alias="imageURL")
    image_data_uri: str | None = Field(default=None, alias="imageDataURI")
    image_base64_data: str | None = Field(default=None, alias="imageBase64Data")
    seed: int | None = None
    cost: Money | None = None
    """USD; present only when the request set includeCost."""
    nsfw_content: bool | None = Field(default=None, alias="NSFWContent")

    @property
    def payload(self) -> tuple[Literal["url", "data_uri", "base64"], str]:
        """Which form the image came in, and its value."""
        if self.image_url is not None:
            return "url", self.image_url
        if self.image_data_uri is not None:
            return "data_uri", self.image_data_uri
        if self.image_base64_data is not None:
            return "base64", self.image_base64_data
        raise ValueError(f"result {self.image_uuid} carries no image")


class Processing(ResponseModel):
    """An ack or a not-yet-finished poll item (any non-final status counts)."""

    task_type: str | None = None
    task_uuid: str = Field(alias="taskUUID")
    status: str | None = "processing"


class ErrorDetail(ResponseModel):
    """The nested ``error`` object of a failed task sent as a data item."""

    code: str = "unknown"
    message: str = ""
    parameter: str | list[str] | None = None


class FailedItem(ResponseModel):
    """A failed task sent in ``data`` rather than ``errors``: ``{"taskUUID": ..,
    "status": "error", "error": {"code": .., "message": ..}}`` (both new SDKs read
    this shape; protocol §10)."""

    task_type: str | None = None
    task_uuid: str = Field(alias="taskUUID")
    status: Literal["error", "failed"] = "error"
    error: ErrorDetail = Field(default_factory=ErrorDetail)

    def as_error(self) -> ErrorItem:
        """The same failure in the shape of an ``errors`` item."""
        return ErrorItem(
            code=self.error.code,
            message=self.error.message,
            parameter=self.error.parameter,
            task_type=self.task_type,
            task_uuid=self.task_uuid,
            status="error",
        )


class UploadResult(ResponseModel):
    task_type: Literal["imageUpload"] = "imageUpload"
    task_uuid: str = Field(alias="taskUUID")
    image_uuid: str = Field(alias="imageUUID")
    image_url: str | None = Field(default=None, alias="imageURL")


class ErrorItem(ResponseModel):
    """One error of a response's ``errors`` array, scoped to a task where known."""

    code: str = "unknown"
    message: str = ""
    parameter: str | list[str] | None = None
    task_type: str | None = None
    task_uuid: str | None = Field(default=None, alias="taskUUID")
    documentation: str | None = None
    status: str | None = None

    @property
    def parameters(self) -> list[str]:
        if self.parameter is None:
            return []
        return [self.parameter] if isinstance(self.parameter, str) else self.parameter


def _item_kind(value: Any) -> str:
    """Tell a data item's kind from its contents (the API has no single tag)."""
    if isinstance(value, dict):
        task_type = value.get("taskType")
        has_image = value.get("imageUUID") is not None
        status = value.get("status")
    else:
        task_type = getattr(value, "task_type", None)
        has_image = getattr(value, "image_uuid", None) is not None
        status = getattr(value, "status", None)
    if status in ("error", "failed"):
        return "failed"
    if task_type == "imageUpload":
        return "upload"
    return "image" if has_image else "processing"


DataItem = Annotated[
    Annotated[ImageResult, Tag("image")]
    | Annotated[UploadResult, Tag("upload")]
    | Annotated[FailedItem, Tag("failed")]
    | Annotated[Processing, Tag("processing")],
    Discriminator(_item_kind),
]


class Envelope(ResponseModel):
    """A whole response body: ``{"data": [...]}``, ``{"errors": [...]}`` or both."""

    data: list[DataItem] = Field(default_factory=list)
    errors: list[ErrorItem] = Field(default_factory=list)

    @field_validator("data", mode="before")
    @classmethod
    def _data_as_list(cls, value: Any) -> Any:
        # One old docs page shows imageUpload's data as a bare object: tolerate it.
        return [value] if isinstance(value, dict) else value


def error_body(
    code: str,
    message: str,
    *,
    parameter: str | list[str] | None = None,
    task_type: str | None = None,
    task_uuid: str | None = None,
) -> dict[str, Any]:
    """A Runware-shaped ``{"errors": [...]}`` body with one error."""
    item = ErrorItem(
        code=code,
        message=message,
        parameter=parameter,
        task_type=task_type,
        task_uuid=task_uuid,
    )
    return {"errors": [item.model_dump(mode="json", exclude_none=True)]}
