# Generated from protos/medgemma_deploy/v1/worker.proto by `python -m medgemma_deploy.dev.protos_build`
# (grpcio-tools 1.81.1). DO NOT EDIT: change the .proto and regenerate.
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_UINT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_UINT8: DType
DTYPE_UINT16: DType
DTYPE_FLOAT64: DType

class Array(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Code(_message.Message):
    __slots__ = ("value", "scheme_designator", "meaning", "scheme_version")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SCHEME_DESIGNATOR_FIELD_NUMBER: _ClassVar[int]
    MEANING_FIELD_NUMBER: _ClassVar[int]
    SCHEME_VERSION_FIELD_NUMBER: _ClassVar[int]
    value: str
    scheme_designator: str
    meaning: str
    scheme_version: str
    def __init__(self, value: _Optional[str] = ..., scheme_designator: _Optional[str] = ..., meaning: _Optional[str] = ..., scheme_version: _Optional[str] = ...) -> None: ...

class Finding(_message.Message):
    __slots__ = ("key", "display_name", "code", "positive_prompts", "negative_prompts")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    key: str
    display_name: str
    code: Code
    positive_prompts: _containers.RepeatedScalarFieldContainer[str]
    negative_prompts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., display_name: _Optional[str] = ..., code: _Optional[_Union[Code, _Mapping]] = ..., positive_prompts: _Optional[_Iterable[str]] = ..., negative_prompts: _Optional[_Iterable[str]] = ...) -> None: ...

class LabelSet(_message.Message):
    __slots__ = ("name", "version", "modalities", "body_parts", "scoring", "threshold", "findings")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    BODY_PARTS_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    modalities: _containers.RepeatedScalarFieldContainer[str]
    body_parts: _containers.RepeatedScalarFieldContainer[str]
    scoring: str
    threshold: float
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., modalities: _Optional[_Iterable[str]] = ..., body_parts: _Optional[_Iterable[str]] = ..., scoring: _Optional[str] = ..., threshold: _Optional[float] = ..., findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version", "random_weights", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    random_weights: bool
    path: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., random_weights: _Optional[bool] = ..., path: _Optional[str] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_seconds", "compute_seconds", "batch_size")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    compute_seconds: float
    batch_size: int
    def __init__(self, queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("images", "label_set", "label_set_name", "return_embeddings", "relevance_finding_keys", "omit_probabilities", "request_id", "images_at_model_input")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABEL_SET_FIELD_NUMBER: _ClassVar[int]
    LABEL_SET_NAME_FIELD_NUMBER: _ClassVar[int]
    RETURN_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_FINDING_KEYS_FIELD_NUMBER: _ClassVar[int]
    OMIT_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_AT_MODEL_INPUT_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Array]
    label_set: LabelSet
    label_set_name: str
    return_embeddings: bool
    relevance_finding_keys: _containers.RepeatedScalarFieldContainer[str]
    omit_probabilities: bool
    request_id: str
    images_at_model_input: bool
    def __init__(self, images: _Optional[_Iterable[_Union[Array, _Mapping]]] = ..., label_set: _Optional[_Union[LabelSet, _Mapping]] = ..., label_set_name: _Optional[str] = ..., return_embeddings: _Optional[bool] = ..., relevance_finding_keys: _Optional[_Iterable[str]] = ..., omit_probabilities: _Optional[bool] = ..., request_id: _Optional[str] = ..., images_at_model_input: _Optional[bool] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "label_set_name", "label_set_version", "finding_keys", "probabilities", "embeddings", "relevance_maps", "timing", "relevance_grids")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_SET_NAME_FIELD_NUMBER: _ClassVar[int]
    LABEL_SET_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINDING_KEYS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_MAPS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_GRIDS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    label_set_name: str
    label_set_version: str
    finding_keys: _containers.RepeatedScalarFieldContainer[str]
    probabilities: Array
    embeddings: Array
    relevance_maps: _containers.RepeatedCompositeFieldContainer[Array]
    timing: Timing
    relevance_grids: _containers.RepeatedCompositeFieldContainer[Array]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., label_set_name: _Optional[str] = ..., label_set_version: _Optional[str] = ..., finding_keys: _Optional[_Iterable[str]] = ..., probabilities: _Optional[_Union[Array, _Mapping]] = ..., embeddings: _Optional[_Union[Array, _Mapping]] = ..., relevance_maps: _Optional[_Iterable[_Union[Array, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., relevance_grids: _Optional[_Iterable[_Union[Array, _Mapping]]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("images", "request_id", "images_at_model_input")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_AT_MODEL_INPUT_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Array]
    request_id: str
    images_at_model_input: bool
    def __init__(self, images: _Optional[_Iterable[_Union[Array, _Mapping]]] = ..., request_id: _Optional[str] = ..., images_at_model_input: _Optional[bool] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("model", "embeddings", "timing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    embeddings: Array
    timing: Timing
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., embeddings: _Optional[_Union[Array, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class EmbedTextRequest(_message.Message):
    __slots__ = ("texts", "request_id")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class EmbedTextResponse(_message.Message):
    __slots__ = ("model", "embeddings", "timing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    embeddings: Array
    timing: Timing
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., embeddings: _Optional[_Union[Array, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class ContentPart(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: Array
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: _containers.RepeatedCompositeFieldContainer[ContentPart]
    def __init__(self, role: _Optional[str] = ..., content: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ...) -> None: ...

class GenerationSettings(_message.Message):
    __slots__ = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DO_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., do_sample: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateReportRequest(_message.Message):
    __slots__ = ("messages", "settings", "prompt_id", "request_id")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    settings: GenerationSettings
    prompt_id: str
    request_id: str
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., settings: _Optional[_Union[GenerationSettings, _Mapping]] = ..., prompt_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReportAdmitted(_message.Message):
    __slots__ = ("n_prompt_tokens", "queue_seconds", "running")
    N_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    n_prompt_tokens: int
    queue_seconds: float
    running: int
    def __init__(self, n_prompt_tokens: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., running: _Optional[int] = ...) -> None: ...

class ReportDelta(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReportFinal(_message.Message):
    __slots__ = ("text", "token_ids", "n_prompt_tokens", "n_generated_tokens", "finish_reason", "seconds", "tokens_per_second", "warnings", "model", "timing", "engine_parameters")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    N_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    N_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ENGINE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    n_prompt_tokens: int
    n_generated_tokens: int
    finish_reason: str
    seconds: float
    tokens_per_second: float
    warnings: _containers.RepeatedScalarFieldContainer[str]
    model: ModelRef
    timing: Timing
    engine_parameters: _containers.RepeatedCompositeFieldContainer[EngineParameter]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., n_prompt_tokens: _Optional[int] = ..., n_generated_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., seconds: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., warnings: _Optional[_Iterable[str]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., engine_parameters: _Optional[_Iterable[_Union[EngineParameter, _Mapping]]] = ...) -> None: ...

class EngineParameter(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class GenerateReportResponse(_message.Message):
    __slots__ = ("admitted", "delta", "final")
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    admitted: ReportAdmitted
    delta: ReportDelta
    final: ReportFinal
    def __init__(self, admitted: _Optional[_Union[ReportAdmitted, _Mapping]] = ..., delta: _Optional[_Union[ReportDelta, _Mapping]] = ..., final: _Optional[_Union[ReportFinal, _Mapping]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("kind", "model", "loaded", "load_error", "device", "dtype", "embedding_dim", "max_context_tokens", "input_rows", "input_columns", "resample", "antialias", "patch_grid")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    LOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_ROWS_FIELD_NUMBER: _ClassVar[int]
    INPUT_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    RESAMPLE_FIELD_NUMBER: _ClassVar[int]
    ANTIALIAS_FIELD_NUMBER: _ClassVar[int]
    PATCH_GRID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    model: ModelRef
    loaded: bool
    load_error: str
    device: str
    dtype: str
    embedding_dim: int
    max_context_tokens: int
    input_rows: int
    input_columns: int
    resample: str
    antialias: bool
    patch_grid: int
    def __init__(self, kind: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., loaded: _Optional[bool] = ..., load_error: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., max_context_tokens: _Optional[int] = ..., input_rows: _Optional[int] = ..., input_columns: _Optional[int] = ..., resample: _Optional[str] = ..., antialias: _Optional[bool] = ..., patch_grid: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_images_per_request", "max_image_pixels", "default_max_new_tokens", "max_new_tokens", "classify_max_batch_size", "classify_max_queue_delay_seconds", "classify_max_queued_images", "report_max_running", "report_max_waiting")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CLASSIFY_MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLASSIFY_MAX_QUEUE_DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLASSIFY_MAX_QUEUED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    REPORT_MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    REPORT_MAX_WAITING_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_images_per_request: int
    max_image_pixels: int
    default_max_new_tokens: int
    max_new_tokens: int
    classify_max_batch_size: int
    classify_max_queue_delay_seconds: float
    classify_max_queued_images: int
    report_max_running: int
    report_max_waiting: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., default_max_new_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., classify_max_batch_size: _Optional[int] = ..., classify_max_queue_delay_seconds: _Optional[float] = ..., classify_max_queued_images: _Optional[int] = ..., report_max_running: _Optional[int] = ..., report_max_waiting: _Optional[int] = ...) -> None: ...

class LabelSetSummary(_message.Message):
    __slots__ = ("name", "version", "finding_keys")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINDING_KEYS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    finding_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., finding_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("api_version", "server_version", "models", "label_sets", "limits", "state")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LABEL_SETS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    api_version: str
    server_version: str
    models: _containers.RepeatedCompositeFieldContainer[ModelDescription]
    label_sets: _containers.RepeatedCompositeFieldContainer[LabelSetSummary]
    limits: Limits
    state: str
    def __init__(self, api_version: _Optional[str] = ..., server_version: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelDescription, _Mapping]]] = ..., label_sets: _Optional[_Iterable[_Union[LabelSetSummary, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., state: _Optional[str] = ...) -> None: ...
