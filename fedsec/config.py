"""The experiment configuration: one typed object, validated in one place.

A config is a TOML file with the sections below; every key is optional and
falls back to the embedded default (the digits quickstart). :func:`parse_config`
checks everything before anything starts: unknown sections and keys, types,
ranges, names that must resolve through a registry (listing the valid choices)
and cross-field constraints such as "more clients than training samples". Every
problem raises :class:`ConfigError`, whose message is one line that names the
field, e.g. ``data.alpha: must be > 0 (got 0.0)``.

Numbers are bounded before any range check: every float must be finite (TOML's
``inf`` and ``nan`` are refused in every field and in ``params`` tables), every
integer within :data:`MAX_INT` in magnitude, and a few fields tighter where the
code needs it (``experiment.seed`` <= :data:`MAX_SEED` so derived per-round
seeds fit torch, ``experiment.rounds`` <= :data:`MAX_ROUNDS`, batch sizes within
the training set, timeouts within 30 days). A config file that sets nothing
(empty, or only comments) is refused: the quickstart runs without one.

Sections ``[aggregation]``, ``[attack]``, ``[privacy]`` and ``[secagg]``
configure the defenses, the threat model, differential privacy and secure
aggregation. Each ``privacy.mode`` is a registered object
(:mod:`fedsec.privacy.modes`) that validates its own part of the config.

This module is the schema only; :mod:`fedsec.assembly` builds the objects a
run uses (the rule, the attack, derived sizes) from a config that passed it.

The user's own code: ``model.name``, ``data.dataset``, ``data.partition`` and
``client.train_fn`` take fedsec's names, names registered in this process
(:func:`fedsec.registry.register_model` and its siblings) or dotted
``"package.module:factory"`` names, imported wherever the config is read
(server, bench workers, Ray actors). A dotted name that does not import or
does not name a callable is a one-line error naming the key. A user's data set
is loaded during validation: only its data knows its size.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_origin, get_type_hints

from fedsec.assembly import (
    build_aggregator,
    build_configured_attack,
    dataset_info_of,
    largest_sum,
    sampled_clients,
    secure_bucket_size,
)
from fedsec.registry import USER_CODE_HINT, DottedNameError, UnknownNameError
from fedsec.wire import WIRE_CONFIG_KEY as WIRE_CONFIG_KEY

if TYPE_CHECKING:
    from fedsec.privacy.modes import PrivacyMode
    from fedsec.secagg.server import SecAggParams

EVASION_ATTACKS = ("none", "fgsm", "pgd")

# WIRE_CONFIG_KEY (the ConfigRecord entry of the config sent to clients) is in fedsec.wire.
ACCOUNTANTS = ("rdp", "prv")

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

#: Largest magnitude of any integer in a config: every count fits a C int, which is
#: what torch and numpy index with; fields with tighter limits check them too.
MAX_INT = 2**31
#: Largest ``experiment.seed``. Clients derive per-round seeds as
#: ``(seed * 1_000_003 + round * 10_007 + partition) * 1_000_003 + round * 7_919 + salt``
#: (:mod:`fedsec.client.app`, :func:`fedsec.attacks.threat.round_generator`), which
#: torch's ``manual_seed`` takes only below 2**63: with seed < 2**23 and rounds and
#: partitions within their limits the largest derived seed is about 8.4e18.
MAX_SEED = 2**23 - 1
#: Largest ``experiment.rounds`` (the round number also enters the derived seeds).
MAX_ROUNDS = 1_000_000
#: Longest round or stage timeout: 30 days. Longer ones overflow the platform's
#: time_t in the waits that use them (``OverflowError`` from ``threading``).
MAX_TIMEOUT_S = 30 * 86_400.0
#: Largest Dirichlet ``data.alpha``: beyond it the split is indistinguishable from IID,
#: and near the float range numpy's sampler returns all-zero proportions.
MAX_ALPHA = 1e6


class ConfigError(ValueError):
    """An invalid experiment configuration; ``str(err)`` is one line naming the field.

    Parameters
    ----------
    field : str
        Dotted path of the offending field (``"data.alpha"``) or the file name.
    problem : str
        What is wrong, with the offending value.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True)
class ExperimentSection:
    """Run identity and global settings."""

    name: str = "quickstart"
    seed: int = 0
    rounds: int = 10
    device: str = "auto"
    results_dir: str = "results"
    #: Checkpoints kept on disk (the newest; round 0 always stays); 0 keeps all.
    keep_checkpoints: int = 0


@dataclass(frozen=True)
class DataSection:
    """Data set and how it is split across clients."""

    dataset: str = "digits"
    data_dir: str = "data"
    partition: str = "iid"
    alpha: float = 0.5
    shards_per_client: int = 2
    num_clients: int = 10


@dataclass(frozen=True)
class ClientSection:
    """Client sampling and local training.

    ``precision`` is ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; fp16 needs
    CUDA and is refused with DP-SGD). ``max_batch`` caps the examples per
    forward/backward pass: a logical batch larger than the cap is split into
    chunks whose gradients are accumulated (same step, less memory); 0 = on
    CUDA the cap that fits the device's free memory, elsewhere no cap. A
    SuperNode's node config (``device``, ``precision``, ``max-batch``)
    overrides ``experiment.device`` and these for that node's hardware.
    """

    fraction: float = 1.0
    evaluate_fraction: float = 0.0
    local_epochs: int = 2
    local_steps: int = 0
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    precision: str = "fp32"
    max_batch: int = 0
    #: The user's training function, registered or ``"package.module:function"``,
    #: called as ``fn(model, x, y, cfg, *, device, seed)`` (see
    #: :func:`fedsec.registry.register_train_fn`); "" = fedsec's own loop.
    train_fn: str = ""


@dataclass(frozen=True)
class ModelSection:
    """Model architecture: a built-in name, a registered one, or ``"package.module:factory"``."""

    name: str = "mlp"


@dataclass(frozen=True)
class ServerSection:
    """Server step applied to the aggregated update."""

    lr: float = 1.0
    momentum: float = 0.0
    round_timeout: float = 600.0
    #: Largest example count a reply may claim; 0 derives it from the data set
    #: (its training split), capped at 2**31. Larger or non-finite counts are excluded.
    max_examples: int = 0
    #: Consecutive rounds with no usable reply after which a run stops (resumable).
    max_failed_rounds: int = 3


@dataclass(frozen=True)
class AggregationSection:
    """Aggregation rule over the stacked client updates, and what runs before it."""

    rule: str = "mean"
    f: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    pre: tuple[str, ...] = ()
    bucket_size: int = 2
    root_size: int = 100


@dataclass(frozen=True)
class AttackSection:
    """Threat model: the attack, who is malicious, what they know (see fedsec.attacks.threat)."""

    name: str = "none"
    num_malicious: int = 0
    fraction: float = 0.0
    knowledge: str = "colluders"
    adaptive: bool = False
    start_round: int = 1
    boost: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvasionSection:
    """Adversarial examples against the global model, and adversarial training."""

    attack: str = "none"
    eps: float = 0.1
    steps: int = 10
    alpha: float = 0.0
    eval_samples: int = 0
    adversarial_training: bool = False


@dataclass(frozen=True)
class PrivacySection:
    """Differential privacy (see the README's "Differential privacy").

    ``mode``: ``dp-sgd`` (record-level DP-SGD on every client, Opacus),
    ``local`` (each client clips its whole update and adds Gaussian noise) or
    ``central`` (DP-FedAvg: the server clips each update and noises the mean) or
    ``distributed`` (under secure aggregation: each client clips its update to
    ``update_clip`` and adds Skellam noise, so every sum the server unmasks is
    DP against the server itself). Give either ``noise_multiplier`` or
    ``target_epsilon`` (solved before training for the whole run);
    ``epsilon_budget`` (default: the target) is what a client's ledger refuses
    to exceed.
    """

    mode: str = "none"
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    update_clip: float = 1.0
    epsilon_budget: float = 0.0
    accountant: str = "rdp"
    secure_mode: bool = False


@dataclass(frozen=True)
class SecAggSection:
    """Secure aggregation (SecAgg+, :mod:`fedsec.secagg`): the server sees only the sum.

    ``clip`` bounds every update coordinate before fixed-point encoding;
    ``weight_cap`` turns example counts into weights ``min(n, cap) / cap`` (0:
    every client weighs 1). ``degree`` / ``threshold`` override the graph
    degree ``k`` and Shamir threshold ``t`` derived from the sampled clients,
    ``dropout_rate`` and ``corrupt_fraction``. ``bits`` = 0 takes the finest
    grid that cannot wrap. ``signed`` adds Ed25519-signed keys and the
    consistency check against a malicious server; ``key_dir`` then holds each
    client's ``<identity>.pem`` and everyone's ``<identity>.pub``.

    ``norm_bound`` > 0: honest clients scale their update to this L2 norm
    before masking and the server discards any (bucket) sum longer than its
    weight times the bound. Bucketed mode: ``aggregation.pre`` starting with
    ``"bucketing"`` runs one secure sum per random bucket of at least
    ``aggregation.bucket_size`` clients and the rule across the bucket means.
    """

    enabled: bool = False
    clip: float = 1.0
    bits: int = 0
    modulus_bits: int = 32
    weight_cap: int = 10_000
    degree: int = 0
    threshold: int = 0
    dropout_rate: float = 0.1
    corrupt_fraction: float = 0.05
    stage_timeout: float = 0.0
    signed: bool = False
    key_dir: str = ""
    norm_bound: float = 0.0


@dataclass(frozen=True)
class SignaturesSection:
    """Signed client replies (Ed25519), checked by the server before aggregation.

    ``required``: every reply must carry a valid signature by a registered
    identity, or it is excluded and logged. ``key_dir`` is the server's
    registry of ``<identity>.pub`` (raw 32-byte Ed25519 public keys); in a
    simulation clients also read their ``<identity>.pem`` from it.
    """

    required: bool = False
    key_dir: str = ""


@dataclass(frozen=True)
class SimulationSection:
    """Resources of Flower's simulation engine (Ray)."""

    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    ray_address: str = ""


@dataclass(frozen=True)
class ExperimentConfig:
    """A complete, validated experiment configuration."""

    experiment: ExperimentSection = field(default_factory=ExperimentSection)
    data: DataSection = field(default_factory=DataSection)
    client: ClientSection = field(default_factory=ClientSection)
    model: ModelSection = field(default_factory=ModelSection)
    server: ServerSection = field(default_factory=ServerSection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    attack: AttackSection = field(default_factory=AttackSection)
    evasion: EvasionSection = field(default_factory=EvasionSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    secagg: SecAggSection = field(default_factory=SecAggSection)
    signatures: SignaturesSection = field(default_factory=SignaturesSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict, the inverse of :func:`parse_config`."""
        return dataclasses.asdict(self)

    def replace(self, section: str, **changes: Any) -> ExperimentConfig:
        """Return a validated copy with ``changes`` applied to ``section``."""
        raw = self.to_dict()
        raw[section].update(changes)
        return parse_config(raw)


_SECTIONS: dict[str, type[Any]] = get_type_hints(ExperimentConfig)


def default_config() -> ExperimentConfig:
    """The embedded default: 10 IID clients, FedAvg, an MLP on bundled digits."""
    return ExperimentConfig()


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a TOML experiment config.

    Raises
    ------
    ConfigError
        If the file is missing, is not valid TOML, or fails validation.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(str(path), f"cannot read file ({err})") from None
    raw = parse_toml(text, str(path))
    if not raw:
        # Almost always a wrong or truncated file; the defaults are one omitted argument away.
        raise ConfigError(
            str(path), "empty config: it sets nothing (omit the config to run the quickstart)"
        )
    return parse_config(raw)


def parse_toml(text: str, where: str) -> dict[str, Any]:
    """Parse TOML text, every failure a one-line :class:`ConfigError` about ``where``.

    ``tomllib`` recurses once per nesting level of arrays and inline tables,
    so a file nested a few thousand levels deep raises ``RecursionError``;
    that is reported as invalid TOML like any other syntax problem.
    """
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(where, f"invalid TOML: {err}") from None
    except RecursionError:
        raise ConfigError(where, "invalid TOML: arrays or tables nested too deeply") from None


def parse_config(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a nested mapping (parsed TOML) into an :class:`ExperimentConfig`.

    Raises
    ------
    ConfigError
        On the first problem found, naming the field.
    """
    for key, value in raw.items():
        if key not in _SECTIONS:
            raise ConfigError(key, f"unknown section{_suggest(key, _SECTIONS)}")
        if not isinstance(value, Mapping):
            raise ConfigError(key, "must be a table such as [" + key + "]")

    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        sections[name] = _build_section(name, cls, raw.get(name, {}))
    config = ExperimentConfig(**sections)
    _check_values(config)
    return config


def _suggest(key: str, valid: Mapping[str, Any] | list[str]) -> str:
    names = list(valid)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; valid: {', '.join(names)}"


def _build_section(section: str, cls: type[Any], values: Mapping[str, Any]) -> Any:
    types = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        where = f"{section}.{key}"
        if key not in types:
            raise ConfigError(where, f"unknown key{_suggest(key, types)}")
        kwargs[key] = _coerce(where, value, types[key])
    return cls(**kwargs)


def _coerce(where: str, value: Any, expected: Any) -> Any:
    origin = get_origin(expected)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(where, f"must be a table such as {{ beta = 0.2 }} (got {value!r})")
        for key, item in value.items():
            if isinstance(item, Mapping | list):
                raise ConfigError(
                    f"{where}.{key}", f"must be a number, string or boolean (got {item!r})"
                )
            if isinstance(item, int | float) and not isinstance(item, bool):
                _check_number(f"{where}.{key}", item)
        return dict(value)
    if origin is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(where, f"must be a list of strings (got {value!r})")
        return tuple(value)
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, f"must be true or false (got {value!r})")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, f"must be an integer (got {value!r})")
        return _check_number(where, value)
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(where, f"must be a number (got {value!r})")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(where, f"must be a finite number (got {value})") from None
        return _check_number(where, number)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(where, f"must be a string (got {value!r})")
        return value
    raise TypeError(f"{where}: unsupported field type {expected!r}")  # pragma: no cover


_Num = TypeVar("_Num", int, float)


def _check_number(where: str, value: _Num) -> _Num:
    """Refuse what no numeric field means: inf, NaN and integers beyond :data:`MAX_INT`.

    TOML has ``inf`` and ``nan`` literals and integers up to 2**63; none of
    them is a sensible rate, timeout or count, and each would fail much later
    (or silently: a NaN compares false with every bound checked after this).
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(where, f"must be a finite number (got {value})")
    elif abs(value) > MAX_INT:
        raise ConfigError(where, f"must be at most 2**31 in magnitude (got {value})")
    return value


def _require(where: str, value: _Num, ok: Callable[[_Num], bool], rule: str) -> None:
    if not ok(value):
        raise ConfigError(where, f"must be {rule} (got {value})")


def _resolve(
    where: str, lookup: Callable[[str], object], name: str, *, user_code: bool = False
) -> None:
    """Look ``name`` up; a miss is a one-line error naming ``where``.

    ``user_code``: the key also takes the user's registered or dotted names,
    which the message of an unknown plain name then mentions.
    """
    try:
        lookup(name)
    except DottedNameError as err:
        raise ConfigError(where, str(err)) from None
    except UnknownNameError as err:
        raise ConfigError(where, f"{err}; {USER_CODE_HINT}" if user_code else str(err)) from None


def _checked_dataset_info(cfg: ExperimentConfig) -> Any:
    """``dataset_info_of`` (:mod:`fedsec.assembly`); a failure is a ConfigError on the key."""
    try:
        return dataset_info_of(cfg)
    except DottedNameError as err:
        raise ConfigError("data.dataset", str(err)) from None
    except UnknownNameError as err:
        raise ConfigError("data.dataset", f"{err}; {USER_CODE_HINT}") from None
    except Exception as err:  # a user's factory may raise anything; the message names it
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(
            "data.dataset", f"loading '{cfg.data.dataset}' failed ({type(err).__name__}: {first})"
        ) from None


def _check_choice(where: str, value: str, choices: tuple[str, ...], kind: str) -> None:
    if value not in choices:
        raise ConfigError(where, f"unknown {kind} '{value}'; valid choices: {', '.join(choices)}")


def _check_values(cfg: ExperimentConfig) -> None:
    # Imported here: the registries pull in torch, and config errors about
    # syntax or unknown keys should not wait for that.
    from fedsec.data import PARTITIONERS
    from fedsec.models import MODELS, check_model_input
    from fedsec.training import OPTIMIZERS, PRECISIONS

    exp, data, client = cfg.experiment, cfg.data, cfg.client
    if not _NAME_PATTERN.match(exp.name):
        raise ConfigError(
            "experiment.name",
            f"must be letters, digits, '.', '_' or '-' (got {exp.name!r})",
        )
    _require("experiment.seed", exp.seed, lambda v: v >= 0, ">= 0")
    _require("experiment.seed", exp.seed, lambda v: v <= MAX_SEED, f"<= {MAX_SEED}")
    _require("experiment.rounds", exp.rounds, lambda v: v >= 1, ">= 1")
    _require("experiment.rounds", exp.rounds, lambda v: v <= MAX_ROUNDS, f"<= {MAX_ROUNDS}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", exp.device):
        raise ConfigError(
            "experiment.device",
            f"must be auto, cpu, mps, cuda or cuda:N (got {exp.device!r})",
        )
    _require("experiment.keep_checkpoints", exp.keep_checkpoints, lambda v: v >= 0, ">= 0")
    if not exp.results_dir:
        raise ConfigError("experiment.results_dir", "must not be empty")

    info = _checked_dataset_info(cfg)
    _resolve("data.partition", PARTITIONERS.get, data.partition, user_code=True)
    _require("data.alpha", data.alpha, lambda v: v > 0, "> 0")
    _require("data.alpha", data.alpha, lambda v: v <= MAX_ALPHA, f"<= {MAX_ALPHA:g} (use iid)")
    _require("data.shards_per_client", data.shards_per_client, lambda v: v >= 1, ">= 1")
    _require("data.num_clients", data.num_clients, lambda v: v >= 1, ">= 1")
    if data.num_clients > info.num_train:
        raise ConfigError(
            "data.num_clients",
            f"{data.num_clients} clients but dataset '{data.dataset}' has only "
            f"{info.num_train} training samples",
        )

    _require("client.fraction", client.fraction, lambda v: 0 < v <= 1, "in (0, 1]")
    _require(
        "client.evaluate_fraction",
        client.evaluate_fraction,
        lambda v: 0 <= v <= 1,
        "in [0, 1]",
    )
    _require("client.local_epochs", client.local_epochs, lambda v: v >= 1, ">= 1")
    _require("client.local_steps", client.local_steps, lambda v: v >= 0, ">= 0 (0 = whole epochs)")
    # A batch larger than the whole training set is a typo, not a setting.
    biggest = info.num_train
    _require("client.batch_size", client.batch_size, lambda v: v >= 1, ">= 1")
    _require(
        "client.batch_size",
        client.batch_size,
        lambda v: v <= biggest,
        f"<= {biggest}, the training examples of '{data.dataset}'",
    )
    _resolve("client.optimizer", OPTIMIZERS.get, client.optimizer)
    _require("client.lr", client.lr, lambda v: v > 0, "> 0")
    _require("client.momentum", client.momentum, lambda v: 0 <= v < 1, "in [0, 1)")
    _require("client.weight_decay", client.weight_decay, lambda v: v >= 0, ">= 0")
    _check_choice("client.precision", client.precision, PRECISIONS, "precision")
    _require("client.max_batch", client.max_batch, lambda v: v >= 0, ">= 0 (0 = automatic)")
    _require(
        "client.max_batch",
        client.max_batch,
        lambda v: v <= biggest,
        f"<= {biggest}, the training examples of '{data.dataset}'",
    )
    if client.train_fn:
        _check_train_fn(cfg)
    mode = _known_privacy_mode(cfg)
    if client.precision == "fp16" and mode is not None and mode.private_training:
        raise ConfigError(
            "client.precision",
            "fp16 cannot be used with DP-SGD (its loss scaling skips steps depending on "
            "the data); use 'bf16' or 'fp32'",
        )

    _resolve("model.name", MODELS.get, cfg.model.name, user_code=True)
    try:
        check_model_input(cfg.model.name, info.input_shape)
    except ValueError as err:
        raise ConfigError("model.name", str(err)) from None

    server = cfg.server
    _require("server.lr", server.lr, lambda v: v > 0, "> 0")
    _require("server.momentum", server.momentum, lambda v: 0 <= v < 1, "in [0, 1)")
    _require("server.round_timeout", server.round_timeout, lambda v: v > 0, "> 0")
    _require(
        "server.round_timeout",
        server.round_timeout,
        lambda v: v <= MAX_TIMEOUT_S,
        f"<= {MAX_TIMEOUT_S:.0f} (30 days)",
    )
    _require("server.max_examples", server.max_examples, lambda v: 0 <= v <= 2**31, "in [0, 2**31]")
    _require("server.max_failed_rounds", server.max_failed_rounds, lambda v: v >= 1, ">= 1")

    _check_privacy(cfg)  # before the rule is built: central DP wraps it
    _check_aggregation(cfg)
    _check_attack(cfg)
    _check_evasion(cfg)
    _check_secagg(cfg)
    if cfg.signatures.required and not cfg.signatures.key_dir:
        raise ConfigError(
            "signatures.key_dir", "required signatures need the directory of registered keys"
        )

    sim = cfg.simulation
    _require("simulation.cpus_per_client", sim.cpus_per_client, lambda v: v > 0, "> 0")
    _require("simulation.gpus_per_client", sim.gpus_per_client, lambda v: v >= 0, ">= 0")


def _check_train_fn(cfg: ExperimentConfig) -> None:
    """``client.train_fn`` resolves, and nothing else asks for fedsec's own loop."""
    from fedsec.registry import TRAIN_FNS

    _resolve("client.train_fn", TRAIN_FNS.get, cfg.client.train_fn, user_code=True)
    mode = _known_privacy_mode(cfg)
    if mode is not None and mode.private_training:
        raise ConfigError(
            "client.train_fn",
            f"privacy.mode '{mode.name}' trains with fedsec's private loop; with your own loop "
            "use fedsec.privacy.make_private inside it and leave privacy.mode off",
        )
    if cfg.evasion.adversarial_training:
        raise ConfigError(
            "client.train_fn",
            "evasion.adversarial_training runs inside fedsec's own loop; it cannot wrap "
            "your training function",
        )


def _known_privacy_mode(cfg: ExperimentConfig) -> PrivacyMode | None:
    """The configured privacy mode, or None while its name is unknown.

    For checks that run before :func:`_check_privacy` refuses an unknown name.
    """
    from fedsec.privacy.modes import PRIVACY_MODES

    name = cfg.privacy.mode
    return PRIVACY_MODES.get(name) if name in PRIVACY_MODES else None


def _check_aggregation(cfg: ExperimentConfig) -> None:
    from fedsec.aggregation import PRE_AGGREGATORS, RULES

    agg = cfg.aggregation
    _resolve("aggregation.rule", RULES.get, agg.rule)
    for step in agg.pre:
        _resolve("aggregation.pre", PRE_AGGREGATORS.get, step)
    if len(set(agg.pre)) != len(agg.pre):
        raise ConfigError("aggregation.pre", f"lists a step twice ({list(agg.pre)})")
    _require("aggregation.f", agg.f, lambda v: v >= 0, ">= 0")
    _require("aggregation.bucket_size", agg.bucket_size, lambda v: v >= 1, ">= 1")
    _require("aggregation.root_size", agg.root_size, lambda v: v >= 1, ">= 1")
    if "f" in agg.params:
        raise ConfigError("aggregation.params.f", "set the number of attackers as aggregation.f")
    try:
        rule = build_aggregator(cfg)
    except ValueError as err:
        raise ConfigError("aggregation.params", str(err)) from None
    n = sampled_clients(cfg)
    s = secure_bucket_size(cfg)
    what = f"{n} clients sampled per round"
    if s:
        n, what = n // s, f"{n // s} buckets of {s} or more from {n} clients per round"
    try:
        rule.check(n)
    except ValueError as err:
        raise ConfigError("aggregation.f", f"{err} ({what})") from None


def _check_secagg(cfg: ExperimentConfig) -> None:
    sa = cfg.secagg
    _require("secagg.clip", sa.clip, lambda v: v > 0, "> 0")
    _require("secagg.bits", sa.bits, lambda v: 0 <= v <= 53, "in [0, 53] (0 = finest that fits)")
    _require("secagg.weight_cap", sa.weight_cap, lambda v: v >= 0, ">= 0 (0 = equal weights)")
    _require("secagg.degree", sa.degree, lambda v: v >= 0, ">= 0 (0 = derived)")
    _require("secagg.threshold", sa.threshold, lambda v: v >= 0, ">= 0 (0 = derived)")
    _require("secagg.dropout_rate", sa.dropout_rate, lambda v: 0 <= v < 1, "in [0, 1)")
    _require("secagg.corrupt_fraction", sa.corrupt_fraction, lambda v: 0 <= v < 1, "in [0, 1)")
    _require("secagg.stage_timeout", sa.stage_timeout, lambda v: v >= 0, ">= 0 (0 = round)")
    _require(
        "secagg.stage_timeout",
        sa.stage_timeout,
        lambda v: v <= MAX_TIMEOUT_S,
        f"<= {MAX_TIMEOUT_S:.0f} (30 days)",
    )
    if sa.modulus_bits not in (32, 64):
        raise ConfigError("secagg.modulus_bits", f"must be 32 or 64 (got {sa.modulus_bits})")
    _require("secagg.norm_bound", sa.norm_bound, lambda v: v >= 0, ">= 0 (0 = no bound)")
    if not sa.enabled:
        if sa.norm_bound:
            raise ConfigError(
                "secagg.norm_bound", "applies to secure aggregation, which is off (enabled = false)"
            )
        return
    agg = cfg.aggregation
    n = sampled_clients(cfg)
    s = secure_bucket_size(cfg)
    if not s and (agg.rule != "mean" or agg.pre):
        steps = " + ".join([*agg.pre, agg.rule])
        raise ConfigError(
            "aggregation.rule",
            f"'{steps}' needs individual client updates, which secure aggregation hides from "
            "the server; only 'mean' works on the secure sum (robust rules under secure "
            'aggregation need the bucketed mode: aggregation.pre = ["bucketing", ...])',
        )
    if s:
        if s < 2:
            raise ConfigError(
                "aggregation.bucket_size",
                f"bucketed secure aggregation needs buckets of at least 2 (got {s}): a bucket "
                "of one is that client's update in the clear",
            )
        if n < 2 * s:
            raise ConfigError(
                "aggregation.bucket_size",
                f"{n} clients per round make fewer than 2 buckets of {s}; a robust rule "
                "needs several buckets",
            )
        if sa.degree or sa.threshold:
            raise ConfigError(
                "secagg.degree",
                "buckets use the complete graph with a threshold derived from the bucket size; "
                "leave secagg.degree and secagg.threshold at 0",
            )
    elif n < 3:
        raise ConfigError(
            "client.fraction",
            f"secure aggregation needs at least 3 clients per round, got {n}: with 2 the "
            "new model reveals each one's update to the other",
        )
    built = build_configured_attack(cfg)
    if built is not None and cfg.attack.knowledge == "omniscient":
        from fedsec.attacks.threat import is_colluding

        if is_colluding(built):
            raise ConfigError(
                "attack.knowledge",
                f"an omniscient '{cfg.attack.name}' reads the honest clients' updates, which "
                'secure aggregation hides; use knowledge = "colluders" (the attackers pool '
                "their own updates before masking)",
            )
    if sa.signed and not sa.key_dir:
        raise ConfigError("secagg.key_dir", "signed secure aggregation needs the clients' key dir")
    _privacy_mode(cfg).check_secure(cfg)
    largest, _ = largest_sum(cfg)
    try:
        for size in range(s, 2 * s) if s else (largest,):  # every sum size a round can make
            _secagg_sum_params(sa, size, 1, bucket_size=s)
    except ValueError as err:
        # A threshold at or below k / 2 (or the signed floor) is the configured threshold's fault.
        field = "secagg.threshold" if sa.threshold and "threshold >" in str(err) else "secagg"
        raise ConfigError(field, f"{err} ({n} clients sampled per round)") from None


def _secagg_sum_params(
    sa: SecAggSection,
    n: int,
    dim: int,
    *,
    bucket_size: int = 0,
    min_survivors: int = 0,
    **encoding: Any,
) -> SecAggParams:
    """The :class:`~fedsec.secagg.server.SecAggParams` of one secure sum of ``n`` clients.

    Validation only: every sum size a round can make must have parameters (the
    server's :class:`~fedsec.strategies.secagg.SecureAggregation` builds its
    own). A bucket (``bucket_size`` > 0) uses the complete graph and is never
    unmasked below ``bucket_size``; otherwise ``k`` and ``t`` come from the
    section (derived or given). ``encoding`` overrides ``bits`` and adds
    ``norm_bound``, ``noise_variance`` and ``headroom``.
    """
    from fedsec.secagg.server import SecAggParams

    encoding = {"clip": sa.clip, "bits": sa.bits, "modulus_bits": sa.modulus_bits, **encoding}
    if bucket_size:
        return SecAggParams.for_bucket(
            n,
            dim,
            min_survivors=bucket_size,
            corrupt_fraction=sa.corrupt_fraction,
            signed=sa.signed,
            **encoding,
        )
    return SecAggParams.for_round(
        n,
        dim,
        dropout_rate=sa.dropout_rate,
        corrupt_fraction=sa.corrupt_fraction,
        degree=sa.degree,
        threshold=sa.threshold,
        signed=sa.signed,
        min_survivors=min_survivors,
        **encoding,
    )


def attack_names() -> tuple[str, ...]:
    """Every valid ``attack.name``."""
    from fedsec.attacks.data_poisoning import DATA_ATTACKS
    from fedsec.attacks.model_poisoning import MODEL_ATTACKS

    return ("none", *DATA_ATTACKS.names(), *MODEL_ATTACKS.names())


def _check_attack_context(cfg: ExperimentConfig, needed: list[str]) -> None:
    """An attack that needs the server rule's context (FLTrust's root update) gets it only
    when adaptive and against a rule that has it."""
    from fedsec.assembly import build_aggregator

    name = cfg.attack.name
    if not cfg.attack.adaptive:
        raise ConfigError(
            "attack.adaptive", f"'{name}' needs the server rule's {', '.join(needed)}: set it true"
        )
    rule = build_aggregator(cfg)
    missing = [key for key in needed if key not in getattr(rule, "requires", frozenset())]
    if missing:
        raise ConfigError(
            "attack.name",
            f"'{name}' targets a rule with a server {', '.join(missing)} (fltrust), "
            f"not '{cfg.aggregation.rule}'",
        )


def _check_attack(cfg: ExperimentConfig) -> None:
    from fedsec.attacks.base import ModelPoisoningAttack
    from fedsec.attacks.threat import KNOWLEDGE, num_malicious

    attack = cfg.attack
    _check_choice("attack.name", attack.name, attack_names(), "attack")
    _check_choice("attack.knowledge", attack.knowledge, KNOWLEDGE, "knowledge")
    _require("attack.num_malicious", attack.num_malicious, lambda v: v >= 0, ">= 0")
    _require("attack.fraction", attack.fraction, lambda v: 0 <= v < 1, "in [0, 1)")
    _require("attack.start_round", attack.start_round, lambda v: v >= 1, ">= 1")
    _require("attack.boost", attack.boost, lambda v: v >= 0, ">= 0 (0 = n / server.lr)")
    n = cfg.data.num_clients
    m = num_malicious(n, attack.num_malicious, attack.fraction)
    if attack.name == "none":
        if m or attack.params:
            raise ConfigError("attack.name", "malicious clients or params set but no attack named")
        return
    if m < 1:
        raise ConfigError(
            "attack.num_malicious",
            f"attack '{attack.name}' needs malicious clients: set attack.num_malicious "
            "or attack.fraction",
        )
    if m >= n:
        raise ConfigError(
            "attack.num_malicious", f"{m} malicious of {n} clients leaves no honest one"
        )
    try:
        built = build_configured_attack(cfg)
    except ValueError as err:
        raise ConfigError("attack.params", str(err)) from None
    if isinstance(built, ModelPoisoningAttack):
        # What the adversary sees in a round where every sampled client replies.
        sampled = sampled_clients(cfg)
        expected = m if sampled == n else max(1, round(m * sampled / n))
        try:
            built.check(expected, sampled)
        except ValueError as err:
            raise ConfigError("attack", f"{err} ({sampled} clients sampled per round)") from None
        if built.requires_context:
            _check_attack_context(cfg, sorted(built.requires_context))
    elif attack.adaptive:
        raise ConfigError(
            "attack.adaptive", f"'{attack.name}' is data poisoning; it cannot target the rule"
        )


def _privacy_mode(cfg: ExperimentConfig) -> PrivacyMode:
    """The configured privacy mode; an unknown name is a one-line error on ``privacy.mode``."""
    from fedsec.privacy.modes import PRIVACY_MODES

    try:
        return PRIVACY_MODES.get(cfg.privacy.mode)
    except UnknownNameError as err:
        raise ConfigError("privacy.mode", str(err)) from None


def _check_privacy(cfg: ExperimentConfig) -> None:
    """The common ``privacy.*`` ranges, then the mode's own checks (:mod:`fedsec.privacy.modes`)."""
    dp = cfg.privacy
    mode = _privacy_mode(cfg)
    _check_choice("privacy.accountant", dp.accountant, ACCOUNTANTS, "accountant")
    _require("privacy.noise_multiplier", dp.noise_multiplier, lambda v: v >= 0, ">= 0")
    _require("privacy.target_epsilon", dp.target_epsilon, lambda v: v >= 0, ">= 0")
    _require("privacy.delta", dp.delta, lambda v: 0 < v < 1, "in (0, 1)")
    _require("privacy.max_grad_norm", dp.max_grad_norm, lambda v: v > 0, "> 0")
    _require("privacy.update_clip", dp.update_clip, lambda v: v > 0, "> 0")
    _require("privacy.epsilon_budget", dp.epsilon_budget, lambda v: v >= 0, ">= 0 (0 = target)")
    mode.check(cfg)


def _check_evasion(cfg: ExperimentConfig) -> None:
    ev = cfg.evasion
    _check_choice("evasion.attack", ev.attack, EVASION_ATTACKS, "evasion attack")
    _require("evasion.eps", ev.eps, lambda v: 0 < v <= 1, "in (0, 1] (pixel units)")
    _require("evasion.steps", ev.steps, lambda v: v >= 1, ">= 1")
    _require("evasion.alpha", ev.alpha, lambda v: v >= 0, ">= 0 (0 = 2.5 * eps / steps)")
    _require("evasion.eval_samples", ev.eval_samples, lambda v: v >= 0, ">= 0 (0 = all)")


def to_toml(cfg: ExperimentConfig) -> str:
    """Render a config as TOML (the subset this schema uses)."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return repr(value)
