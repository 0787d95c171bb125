"""The organizer's project file (`project.yaml`): one typed, validated config for the coordinator.

Unknown keys are errors, and every error names the field and the fix. Example (configs/project.yaml):

    run: demo
    state_dir: runs/coordinator
    leases: {duration_s: 60, heartbeat_interval_s: 10, max_attempts: 3, max_lifetime_s: 86400}
    limits: {max_leases_per_token: 4, max_upload_bytes: 67108864, max_failures_per_token: 20,
             failure_window_s: 600, max_workers_per_token: 64, max_concurrent_rpcs: 512}

The optional `synthetic` section (SyntheticConfig) drives `mujina-coordinator plan`: personas, seed
documents, templates, teacher and judge models, sampling and batch sizes. The optional `swarm` section
(coordinator/swarm_plan.py) drives swarm training rounds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .swarm_plan import SwarmSection


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LeaseConfig(_Strict):
    duration_s: float = Field(60.0, gt=0, description="a lease not renewed by a heartbeat within this many "
                                                        "seconds expires and its task is requeued")
    heartbeat_interval_s: float = Field(10.0, gt=0, description="how often workers are told to heartbeat; must be "
                                                                  "well below duration_s")
    sweep_interval_s: float = Field(1.0, gt=0, description="how often expired leases are looked for")
    max_attempts: int = Field(3, ge=1, description="failed or expired attempts after which a task goes dead")
    max_lifetime_s: float = Field(86400.0, gt=0, description="a lease is not renewed past this many seconds after "
                                  "it was granted, however often its worker heartbeats: it expires and its task "
                                  "is requeued (an attempt counted), so no worker holds a task forever")

    @model_validator(mode="after")
    def _heartbeat_below_duration(self):
        if self.heartbeat_interval_s >= self.duration_s:
            raise ValueError(f"leases.heartbeat_interval_s ({self.heartbeat_interval_s}) must be below "
                             f"leases.duration_s ({self.duration_s}), or every lease expires between two "
                             "heartbeats: lower heartbeat_interval_s or raise duration_s")
        return self


class LimitConfig(_Strict):
    max_leases_per_token: int = Field(4, ge=1, description="concurrent leases one token may hold (a token's own "
                                                            "--max-leases overrides it)")
    max_upload_bytes: int = Field(64 * 2**20, ge=0, description="largest result upload accepted by Complete")
    no_work_retry_s: float = Field(10.0, gt=0, description="retry_after_s told to a worker that got no task")
    max_message_bytes: int = Field(4 * 2**20, ge=2**16, description="largest single gRPC message; uploads and "
                                                                    "fetches are chunked below this")
    max_failures_per_token: int = Field(20, ge=1, description="a token that failed this many tasks (Fail with any "
                                        "reason but SHUTDOWN, or results its validator refused) within "
                                        "failure_window_s gets no task until the oldest of them leaves the window")
    failure_window_s: float = Field(600.0, gt=0, description="the window of max_failures_per_token, seconds")
    max_workers_per_token: int = Field(64, ge=1, description="live workers one token may register (a worker is "
                                       "live until leases.duration_s after its last call); Register past it is "
                                       "refused with RESOURCE_EXHAUSTED")
    max_concurrent_rpcs: int = Field(512, ge=1, description="calls the gRPC server handles at once; more are refused "
                                     "at once with RESOURCE_EXHAUSTED (clients retry them). Each may hold one "
                                     "message of up to max_message_bytes in memory")


class ServerConfig(_Strict):
    listen: str = Field("127.0.0.1:50051", description="HOST:PORT to serve gRPC on (--listen overrides)")
    tls_cert: Path | None = Field(None, description="PEM certificate chain; with tls_key enables TLS")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert")
    bootstrap_peers: list[str] = Field(default_factory=list, description="hivemind multiaddrs handed to workers")

    @model_validator(mode="after")
    def _tls_pair(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("server.tls_cert and server.tls_key go together: set both to serve TLS, or neither")
        if not re.fullmatch(r"[^\s:]*:\d+|\[[0-9a-fA-F:]+\]:\d+", self.listen):
            raise ValueError(f"server.listen must be HOST:PORT (e.g. 0.0.0.0:50051), got {self.listen!r}")
        return self


class TeacherConfig(_Strict):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="the teacher's name; workers "
                      "map it to a local directory (`--teacher NAME=DIR` or [teachers] in worker.toml)")
    path: Path | None = Field(None, description="a Hugging Face directory of the teacher on the coordinator: its "
                              "files hash is what workers must match; also the default path for workers")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="model files hash (see "
                               "data_shards.synthetic.model_files_hash); computed from `path` when absent")

    @model_validator(mode="after")
    def _path_or_hash(self):
        if self.path is None and self.sha256 is None:
            raise ValueError(f"teacher {self.name!r}: give `path` (a local Hugging Face directory) or `sha256`")
        return self


class SamplingConfig(_Strict):
    temperature: float = Field(0.8, ge=0, description="0 is greedy decoding")
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(512, ge=1, le=32768)
    seed: int = Field(0, ge=0, description="base seed; each task's seed is derived from it and the task id")
    quantize: Literal["none", "4bit", "8bit", "auto"] = Field("none", description="bitsandbytes loading on "
                                                             "CUDA; auto: only when the model does not fit")


class SyntheticConfig(_Strict):
    personas: list[Path] = Field(..., min_length=1, description="YAML lists of {id, lang, description}, e.g. "
                                 "configs/personas.ja.yaml")
    seeds: list[Path] = Field(..., min_length=1, description="seed documents: JSONL files ({\"text\": ...}) or "
                              "shard directories (decoded with their tokenizer/)")
    languages: list[Literal["ja", "en"]] = Field(["ja", "en"], min_length=1)
    templates: list[str] = Field(["qa", "summary", "rephrase", "dialogue", "instruction"], min_length=1,
                                 description="task templates (data_shards/synthetic.py TEMPLATES)")
    teacher: TeacherConfig
    judge: TeacherConfig | None = Field(None, description="the judge model (default: the teacher)")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    batch_size: int = Field(8, ge=1, description="prompts per generate task (and per generate() call)")
    judge_batch_size: int = Field(8, ge=1, description="answer pairs per judge task")
    max_prompts: int = Field(1000, ge=1, description="prompts planned (a seeded choice among all combinations)")
    max_seed_chars: int = Field(2000, ge=1, description="seed texts are cut to this many characters")
    min_output_chars: int = Field(20, ge=1, description="shorter answers are refused")
    max_output_chars: int = Field(20000, ge=1, description="longer answers are refused")
    tokenizer: Path | None = Field(None, description="a mujina tokenizer directory: accepted records are sharded "
                                   "with it into STATE_DIR/synthetic/shards by `plan`")
    priority: int = Field(0, description="priority of the planned tasks")

    @model_validator(mode="after")
    def _known_templates(self):
        from data_shards.synthetic import TEMPLATES

        unknown = [t for t in self.templates if t not in TEMPLATES]
        if unknown:
            raise ValueError(f"synthetic.templates: unknown {unknown}; known: {', '.join(TEMPLATES)}")
        if self.min_output_chars >= self.max_output_chars:
            raise ValueError("synthetic.min_output_chars must be below max_output_chars")
        return self


class ProjectConfig(_Strict):
    run: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="run name (letters, digits, ._-)")
    state_dir: Path = Field(Path("runs/coordinator"), description="where the SQLite store, results, shards/ and "
                                                                   "checkpoints/ live; relative to the project file")
    db: str | None = Field(None, description="SQLAlchemy URL of the store (--db overrides); default SQLite "
                                             "STATE_DIR/coordinator.db, or postgresql+psycopg://USER@HOST/DB")
    leases: LeaseConfig = Field(default_factory=LeaseConfig)
    limits: LimitConfig = Field(default_factory=LimitConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    synthetic: SyntheticConfig | None = Field(None, description="persona-driven synthetic data (`plan`)")
    swarm: SwarmSection | None = Field(None, description="swarm training settings (see coordinator/swarm_plan.py); "
                                                         "start a run with `mujina-coordinator init-swarm`")

    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.state_dir / 'coordinator.db'}"


def _describe(err: ValidationError, path: Path | str) -> str:
    lines = [f"{path}: invalid project file"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key; remove it or check its spelling (see configs/project.yaml)")
        else:
            lines.append(f"  {field}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def load_project(path: str | Path, **overrides) -> ProjectConfig:
    """Read and validate a project file; relative state_dir resolves against the file's directory.

    Raises ValueError naming each wrong field and its fix."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"project file {path} not found; start from configs/project.yaml") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a project file is a YAML mapping (run: ..., state_dir: ...)")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = ProjectConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(_describe(err, path)) from None
    if not cfg.state_dir.is_absolute():
        cfg = cfg.model_copy(update={"state_dir": (path.parent / cfg.state_dir).resolve()})
    if cfg.synthetic is not None:
        cfg = cfg.model_copy(update={"synthetic": _resolve_synthetic(cfg.synthetic, path.parent)})
    if cfg.swarm is not None and cfg.swarm.shards is not None and not cfg.swarm.shards.is_absolute():
        cfg = cfg.model_copy(update={"swarm": cfg.swarm.model_copy(
            update={"shards": (path.parent / cfg.swarm.shards).resolve()})})
    if cfg.swarm is not None and cfg.swarm.shards is not None and not (cfg.swarm.shards / "manifest.json").is_file():
        raise ValueError(f"{path}: swarm.shards: {cfg.swarm.shards} has no manifest.json; point it at the output "
                         "directory of `mujina-data shard`, or remove it to train on synthetic data")
    return cfg


def _resolve_synthetic(syn: SyntheticConfig, base: Path) -> SyntheticConfig:
    """Relative paths of the synthetic section resolve against the project file's directory."""
    at = lambda p: p if p is None or p.is_absolute() else (base / p).resolve()  # noqa: E731
    teachers = {k: t.model_copy(update={"path": at(t.path)}) for k, t in (("teacher", syn.teacher),
                                                                         ("judge", syn.judge)) if t is not None}
    return syn.model_copy(update={"personas": [at(p) for p in syn.personas], "seeds": [at(p) for p in syn.seeds],
                                  "tokenizer": at(syn.tokenizer), **teachers})
