"""The names of what travels between fedsec's server and clients, and of node settings.

One module names every string two processes must agree on: the keys of the
records in a Flower ``Message`` (Flower's own ``arrays``/``config``/``metrics``
and fedsec's records), the stages of the SecAgg+ protocol (Bonawitz et al.,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS
2017, Figure 4; Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020), the reply metrics the simulation's
adversary and referee read, the node-config keys a SuperNode's operator sets
(``--node-config``), the keys fedsec keeps in a node's ``context.state``, and
the error codes fedsec's client mods reply with. The modules that write or
read one import it from here; the server side never imports a wire name from
``fedsec.client``.

A value may appear under two names only where both name the same thing in two
places; :data:`SAME_THING` lists those pairs and says why. ``tests/test_wire.py``
checks that, and that no other module defines one of these strings again.

This module imports nothing (a SuperNode imports the ClientApp, and with it
this module, for every message).
"""

from __future__ import annotations

__all__ = [
    "ADVERSARY_KEY",
    "ADVERTISE_KEYS_STAGE",
    "ARRAYS_KEY",
    "COLLUSION_REFUSED",
    "CONFIG_KEY",
    "CONSISTENCY_CHECK_STAGE",
    "DATA_DIR_KEY",
    "DELTA_CAP_KEY",
    "DEVICE_KEY",
    "DP_EPSILON_MAX_KEY",
    "EPSILON_CAP_KEY",
    "IDENTIFY_STAGE",
    "LEDGER_DIR_KEY",
    "LEDGER_KEY",
    "LOCAL_DP_REFUSED",
    "LOCAL_DP_STATE_KEY",
    "LOCAL_WORK_REFUSED",
    "MALICIOUS_TAG",
    "MASKED_INPUT_STAGE",
    "MASKED_KEY",
    "MAX_BATCH_KEY",
    "MAX_LOCAL_EXAMPLES_KEY",
    "METRICS_KEY",
    "NUM_EXAMPLES_ARRAY",
    "NUM_EXAMPLES_KEY",
    "NUM_PARTITIONS_KEY",
    "PARTITION_ID_KEY",
    "PRECISION_KEY",
    "PRIVACY_BUDGET_EXHAUSTED",
    "PRIVACY_LEDGER_UNUSABLE",
    "PRIVATE_EVALUATION_REFUSED",
    "SAME_THING",
    "SECAGG_IDENTITY_KEY",
    "SECAGG_KEY",
    "SECAGG_KEY_DIR_KEY",
    "SECAGG_MAX_DEGREE_KEY",
    "SECAGG_MAX_NODES_KEY",
    "SECAGG_MIN_SUM_KEY",
    "SECAGG_NEXT_KEY",
    "SECAGG_REFUSED",
    "SECAGG_REQUIRED_KEY",
    "SECAGG_STAGES",
    "SERVER_ROUND_KEY",
    "SHARE_KEYS_STAGE",
    "SIGNATURE_KEY",
    "SIGNING_IDENTITY_KEY",
    "SIGNING_KEY_PATH_KEY",
    "SIGNING_REFUSED",
    "STAGE_KEY",
    "STATE_DIR_KEY",
    "TRUTH_TAG",
    "UNMASK_STAGE",
    "USER_MODULES_KEY",
    "WIRE_CONFIG_KEY",
]

# --- Flower's record keys (the conventions of Flower's own strategies and apps) ---

#: ArrayRecord of the model: the strategy writes it in requests, a ClientApp reads it and
#: writes its trained model back under it; SecAgg, the adversary and local DP read it too.
ARRAYS_KEY = "arrays"
#: ConfigRecord of the round's settings: the strategy (and SecureAggregation) write it,
#: the ClientApp and fedsec's client mods read it.
CONFIG_KEY = "config"
#: MetricRecord of a reply: the ClientApp writes it, the strategy and filters read it.
METRICS_KEY = "metrics"
#: Reply metric of a client's example count: the ClientApp writes it, the strategy
#: weights by it and secagg_mod turns it into the masked weight.
NUM_EXAMPLES_KEY = "num-examples"
#: Round number in the ``config`` record: the strategy writes it, clients and filters read it.
SERVER_ROUND_KEY = "server-round"

# --- fedsec's own records in a Message ---

#: ConfigRecord entry of the validated experiment config (JSON): fedsec's ServerApp writes
#: it in the ``config`` record, fedsec's ClientApp and its signing/secagg fallbacks read it.
WIRE_CONFIG_KEY = "fedsec-config"
#: ConfigRecord of a SecAgg+ protocol message, both ways: SecureAggregation writes requests,
#: secagg_mod replies under it (and keeps its round state under ``fedsec-secagg.r<round>``).
SECAGG_KEY = "fedsec-secagg"
#: ConfigRecord of the next round's set-up stage riding along (pipelining): written by
#: SecureAggregation, answered by secagg_mod under the same key.
SECAGG_NEXT_KEY = "fedsec-secagg-next"
#: ArrayRecord (and its Array) of the masked vector in a masked-input reply: secagg_mod
#: writes it, SecureAggregation (and the simulation's adversary) read it.
MASKED_KEY = "masked"
#: ConfigRecord (``identity``, ``signature``) of a reply's signature: the signing mod writes
#: it, SignatureFilter reads and strips it.
SIGNATURE_KEY = "fedsec-signature"
#: ArrayRecord of a colluder's crafted update in a resent masked-input request: the
#: simulation's AdversaryFilter writes it, collusion_mod masks it (simulations only).
ADVERSARY_KEY = "fedsec-adversary"
#: Array in the :data:`ADVERSARY_KEY` record of the colluder's own example count: written by
#: AdversaryFilter, read by collusion_mod.
NUM_EXAMPLES_ARRAY = "num-examples"

# --- SecAgg+ stages (the ``stage`` entry of a :data:`SECAGG_KEY` record) ---

#: Entry of a SecAgg record naming its stage: fedsec.secagg.messages writes and parses it;
#: collusion_mod reads it to find the masked-input stage.
STAGE_KEY = "stage"
#: Stage 0: SecureAggregation asks for two public keys; secagg_mod answers.
ADVERTISE_KEYS_STAGE = "advertise-keys"
#: Stage 1: SecureAggregation relays the neighbours' keys; secagg_mod sends encrypted shares.
SHARE_KEYS_STAGE = "share-keys"
#: Stage 2: SecureAggregation relays the shares; secagg_mod sends the masked update
#: (collusion_mod and AdversaryFilter act at this stage in simulations).
MASKED_INPUT_STAGE = "masked-input"
#: Stage 3 (signed mode): SecureAggregation sends the survivor set; secagg_mod signs it.
CONSISTENCY_CHECK_STAGE = "consistency-check"
#: Stage 4: SecureAggregation sends the survivor set; secagg_mod sends the shares to unmask.
UNMASK_STAGE = "unmask"
#: Stage asking a node for its long-term identity (signed mode, once per node):
#: SecureAggregation writes it, secagg_mod answers (not one of :data:`SECAGG_STAGES`).
IDENTIFY_STAGE = "identify"
#: The protocol's stages in order, as fedsec.secagg.messages parses them.
SECAGG_STAGES = (
    ADVERTISE_KEYS_STAGE,
    SHARE_KEYS_STAGE,
    MASKED_INPUT_STAGE,
    CONSISTENCY_CHECK_STAGE,
    UNMASK_STAGE,
)

# --- reply metrics ---

#: Reply metric by which a colluder tags its reply for the simulation's adversary:
#: collusion_mod writes it, AdversaryFilter reads and removes it.
MALICIOUS_TAG = "fedsec.malicious"
#: Reply metric of the ground truth for the simulation's referee: malicious clients
#: (collusion_mod, fedsec's ClientApp) write it, AdversaryFilter reads and removes it.
TRUTH_TAG = "fedsec.truth.malicious"
#: Reply metric of a client's privacy spend (the only metric allowed under SecAgg):
#: fedsec's ClientApp writes it, secagg_mod lets it through, SecureAggregation keeps the max.
DP_EPSILON_MAX_KEY = "dp_epsilon_max"

# --- node config (``--node-config``, or set by Flower's simulation) ---

#: Node config of the partition a node holds: Flower's simulation (or the operator) sets it,
#: fedsec's ClientApp and attack/collusion mods read it; the ClientApp also reports it as a
#: reply metric, which the strategy records as an untrusted claim.
PARTITION_ID_KEY = "partition-id"
#: Node config of the number of partitions: Flower's simulation and fedsec's in-process
#: grid set it.
NUM_PARTITIONS_KEY = "num-partitions"
#: Node config (bool): this node trains in secure aggregation rounds only; read by secagg_mod.
SECAGG_REQUIRED_KEY = "secagg-required"
#: Node config: never unmask a survivor set smaller than this (default 2); read by secagg_mod.
SECAGG_MIN_SUM_KEY = "secagg-min-sum"
#: Node config lowering the protocol's ceiling on the round size; read by secagg_mod.
SECAGG_MAX_NODES_KEY = "secagg-max-nodes"
#: Node config lowering the protocol's ceiling on the graph degree; read by secagg_mod.
SECAGG_MAX_DEGREE_KEY = "secagg-max-degree"
#: Node config of the folder of SecAgg identity keys (signed mode); secagg_mod and the
#: signing mod read it.
SECAGG_KEY_DIR_KEY = "secagg-key-dir"
#: Node config of the node's SecAgg identity name (signed mode); secagg_mod and signing read it.
SECAGG_IDENTITY_KEY = "secagg-identity"
#: Node config of the PEM path of the node's reply-signing key; read by the signing mod
#: (``fedsec deploy certs`` prints it).
SIGNING_KEY_PATH_KEY = "signing-key"
#: Node config of the identity the node signs replies as (else the key file's stem);
#: read by the signing mod.
SIGNING_IDENTITY_KEY = "signing-identity"
#: Node config of the folder holding the node's durable state (privacy ledger); read by
#: fedsec.client.privacy and local_dp.
STATE_DIR_KEY = "state-dir"
#: Node config of the node's torch device (``cpu``, ``cuda:0``, ``mps``, ``auto``): overrides
#: ``experiment.device``; read by fedsec.client.handlers.
DEVICE_KEY = "device"
#: Node config of the node's autocast precision (``fp32``, ``bf16``, ``fp16``): overrides
#: ``client.precision``; read by fedsec.client.handlers.
PRECISION_KEY = "precision"
#: Node config of the most examples per forward/backward pass on the node: overrides
#: ``client.max_batch``; read by fedsec.client.handlers.
MAX_BATCH_KEY = "max-batch"
#: Node config of the most local work a round may ask of the node, in examples passed
#: forward and backward (each PGD step of adversarial training one more pass); read by
#: fedsec.client.handlers.
MAX_LOCAL_EXAMPLES_KEY = "max-local-examples"
#: Node config of the folder holding the node's data sets: a deployed node reads its data
#: from here (default: ``data``), never from a folder the server's config names; read by
#: fedsec.client.handlers.
DATA_DIR_KEY = "data-dir"
#: Node config of the node's own epsilon cap: the budget is never above it, whatever the
#: server-sent config says; read by fedsec.client.privacy.
EPSILON_CAP_KEY = "epsilon-budget"
#: Node config of the node's own delta cap; read by fedsec.client.privacy.
DELTA_CAP_KEY = "delta-budget"
#: Node config of comma-separated module prefixes in which the node resolves a config's
#: dotted names; read by fedsec's ClientApp.
USER_MODULES_KEY = "user-modules"

# --- round config written by fedsec's server ---

#: ``config`` entry naming a simulation's ledger folder: fedsec's ServerApp writes it
#: (simulations only), fedsec.client.privacy reads it.
LEDGER_DIR_KEY = "privacy-ledger-dir"

# --- a node's ``context.state`` ---

#: ConfigRecord of fedsec's ClientApp's privacy ledger in ``context.state`` (fedsec.client.privacy).
LEDGER_KEY = "fedsec.privacy-ledger"
#: ConfigRecord of the ledger histories local_dp committed, in ``context.state`` (client mods).
LOCAL_DP_STATE_KEY = "fedsec.local-dp-ledger"

# --- error codes of refused replies (Flower's ErrorCode uses 0-8) ---

#: A reply refused because it would exceed the privacy budget (fedsec.client.privacy, local_dp).
PRIVACY_BUDGET_EXHAUSTED = 4001
#: A reply refused because the node's privacy ledger cannot be used (privacy, local_dp).
PRIVACY_LEDGER_UNUSABLE = 4002
#: A training reply local_dp cannot privatize (no ArrayRecord, other keys or shapes,
#: non-finite update).
LOCAL_DP_REFUSED = 4003
#: A train round refused because it asks more local work than the node's ``max-local-examples``.
LOCAL_WORK_REFUSED = 4004
#: An evaluate request refused by a deployed node whose data DP protects from the server.
PRIVATE_EVALUATION_REFUSED = 4005
#: A SecAgg request secagg_mod refused (one-line reason); SecureAggregation counts a dropout.
SECAGG_REFUSED = 4601
#: A reply the signing mod refuses to send unsigned (no key, unusable key).
SIGNING_REFUSED = 4602
#: A crafted update collusion_mod refuses to mask (simulations only).
COLLUSION_REFUSED = 4611

#: Pairs of names that share a value on purpose: both name the same thing in two places.
SAME_THING: dict[frozenset[str], str] = {
    frozenset({"NUM_EXAMPLES_KEY", "NUM_EXAMPLES_ARRAY"}): (
        "a client's example count: a reply metric, and an Array of the adversary record"
    ),
}
