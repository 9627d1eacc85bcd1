# ruff: noqa: E501  (one key per line reads best; the text is Markdown for a table cell)
"""One-line descriptions of the experiment config's keys, for the generated reference.

``scripts/gen_docs.py`` writes ``docs/reference/config.md`` from the config
dataclasses (:mod:`fedsec.config`): every section and key with its type and
default, read from the code. A key's description is its ``#:`` comment in the
dataclass when it has one, else the entry below. ``tests/test_docs.py`` fails
when a key has neither, when an entry below names no key, or when the
committed page differs from what the generator writes now.

Valid names (data sets, models, rules, attacks, ...) are not repeated here:
the generator lists them from the registries.
"""

from __future__ import annotations

#: Introduction of each section, shown under its heading.
SECTIONS: dict[str, str] = {
    "experiment": "Run identity and global settings.",
    "data": "Data set and how it is split across clients (see [Data and models](../data-and-models.md)).",
    "client": "Client sampling and local training.",
    "model": "Model architecture (see [Data and models](../data-and-models.md)).",
    "server": "Server step applied to the aggregated update, and round limits.",
    "aggregation": "Aggregation rule over the stacked updates, and what runs before it (see [Aggregation rules](../aggregation.md)).",
    "attack": "Threat model: the attack, who is malicious, what they know (see [Attacks](../attacks.md)).",
    "evasion": "Adversarial examples against the global model, and adversarial training.",
    "privacy": "Differential privacy (see [Differential privacy](../privacy.md)).",
    "secagg": "Secure aggregation, SecAgg+ (see [Secure aggregation](../secure-aggregation.md)).",
    "signatures": "Signed client replies (see [Signed updates](../signatures.md)).",
    "simulation": "Resources of Flower's simulation engine (Ray; see [Running with flwr and Ray](../flwr-and-ray.md)).",
}

#: ``"section.key"`` -> what the key means (Markdown, one line).
KEYS: dict[str, str] = {
    "experiment.name": "run name: letters, digits, `.`, `_`, `-`",
    "experiment.seed": "seeds the data split, partitions, initial model, sampling and local shuffling",
    "experiment.rounds": "federated rounds (>= 1)",
    "experiment.device": "`auto`, `cpu`, `cuda`, `cuda:N`, `mps` (a deployed node uses its node config `device`)",
    "experiment.results_dir": "parent folder of run directories (no `..` component; not itself a symlink)",
    "data.dataset": 'the data set: a built-in name, one registered in the process (`fedsec.registry`) or a dotted `"package.module:factory"`',
    "data.data_dir": "root of the local data sets (simulations; a deployed node uses its node config `data-dir`)",
    "data.partition": 'how the training split is divided among clients: a built-in name, a registered one or a dotted `"package.module:function"`',
    "data.alpha": "Dirichlet concentration (> 0; smaller is more skewed)",
    "data.shards_per_client": "shards per client (>= 1)",
    "data.num_clients": "number of clients (1 .. training samples)",
    "client.fraction": "fraction of clients sampled per round, in (0, 1]",
    "client.evaluate_fraction": "fraction asked to evaluate on local data each round (0 = off)",
    "client.local_epochs": "local epochs per round",
    "client.local_steps": "stop after this many local steps (FedSGD-style rounds); 0 = whole epochs",
    "client.batch_size": "local batch size",
    "client.optimizer": "local optimizer",
    "client.lr": "local learning rate",
    "client.momentum": "SGD momentum, in [0, 1) (ignored by Adam/AdamW)",
    "client.weight_decay": "weight decay",
    "client.precision": "`fp32`, `bf16` or `fp16` autocast (fp16: CUDA only, not with DP-SGD); node config `precision` overrides (a deployed node uses only its own)",
    "client.max_batch": "most examples per forward/backward pass (larger batches go in chunks, same step); 0 = fit free GPU memory on CUDA, no cap elsewhere; node config `max-batch` overrides (a deployed node uses only its own)",
    "model.name": 'the model, checked against the data set\'s input size: a built-in name, a registered one or a dotted `"package.module:factory"`',
    "server.lr": "server learning rate on the aggregated update",
    "server.momentum": "server momentum (FedAvgM), in [0, 1)",
    "server.round_timeout": "seconds to wait for replies and for nodes to connect",
    "aggregation.rule": "aggregation rule over the stacked updates (see the [rule table](rules.md))",
    "aggregation.f": "Byzantine clients assumed per round, passed to every rule and wrapper that takes `f`",
    "aggregation.params": "the rule's other parameters, e.g. `{ beta = 0.2 }`",
    "aggregation.pre": "pre-aggregation steps, applied in order; under secure aggregation a leading `bucketing` selects the [bucketed mode](../secure-aggregation.md#robust-rules-under-secure-aggregation-bucketed-mode)",
    "aggregation.bucket_size": "clients per bucket (`s`) for `bucketing`",
    "aggregation.root_size": "size of the server's root data set for `fltrust` (drawn, seeded, from the training pool)",
    "attack.name": "the attack (see the [attack table](attacks.md))",
    "attack.num_malicious": "malicious clients (a fixed set of partitions drawn with the seed)",
    "attack.fraction": "or: malicious fraction of `data.num_clients`, in [0, 1)",
    "attack.knowledge": "`colluders` (the malicious clients' own honest updates) or `omniscient` (all honest updates)",
    "attack.adaptive": "the attacker knows and targets the aggregation rule (Min-Max, Min-Sum, Fang)",
    "attack.start_round": "first round the malicious clients act",
    "attack.boost": "factor on the malicious updates; `0` = model replacement, n / (server.lr x m)",
    "attack.params": "the attack's parameters, e.g. `{ epsilon = 100.0 }`",
    "evasion.attack": "`fgsm` or `pgd`: the server reports robust accuracy each round",
    "evasion.eps": "L-infinity radius in pixel units ([0, 1] images)",
    "evasion.steps": "PGD steps",
    "evasion.alpha": "PGD step size in pixel units (0 = 2.5 x eps / steps)",
    "evasion.eval_samples": "test images used for robust accuracy (0 = all)",
    "evasion.adversarial_training": "clients train on PGD examples (Madry et al. 2018)",
    "privacy.mode": "where the noise is added: on each client, on the server or inside secure aggregation (see [Differential privacy](../privacy.md))",
    "privacy.noise_multiplier": "sigma; give this or `target_epsilon`",
    "privacy.target_epsilon": "epsilon for the whole run; sigma is solved before training",
    "privacy.delta": "delta",
    "privacy.max_grad_norm": "DP-SGD per-example clipping bound",
    "privacy.update_clip": "local / central / distributed DP: clipping bound C (L2) of a whole update",
    "privacy.epsilon_budget": "what a client's ledger refuses to exceed (0 = `target_epsilon`)",
    "privacy.accountant": "`rdp` or `prv` (Opacus's accountants)",
    "privacy.secure_mode": "noise and sampling from the OS's CSPRNG (`os.urandom`)",
    "secagg.enabled": "SecAgg+: the server sees only the sum of the updates",
    "secagg.clip": "every update coordinate is clipped to `[-clip, clip]` before encoding",
    "secagg.bits": "fixed-point depth; 0 = the finest that n clients cannot overflow",
    "secagg.modulus_bits": "ring `Z_2^32` (uint32) or `Z_2^64`",
    "secagg.weight_cap": "weight = `min(num_examples, cap) / cap`; 0 = equal weights",
    "secagg.degree": "neighbour-graph degree k; 0 = derived",
    "secagg.threshold": "Shamir threshold t; 0 = derived",
    "secagg.dropout_rate": "dropouts the derived (k, t) must survive",
    "secagg.corrupt_fraction": "clients colluding with the server that (k, t) must resist",
    "secagg.stage_timeout": "seconds per protocol stage (0 = `server.round_timeout`)",
    "secagg.signed": "malicious-server mode: Ed25519-signed keys + consistency check",
    "secagg.key_dir": "signed mode: `<identity>.pem` / `<identity>.pub` files",
    "secagg.norm_bound": "L2 bound honest clients apply before masking; the server discards (bucket) sums longer than weight x bound (0 = off)",
    "signatures.required": "every reply must carry a valid Ed25519 signature by a registered identity, or it is excluded (round metric `signatures_rejected`)",
    "signatures.key_dir": "the registry: `<identity>.pub` (raw 32-byte keys); in a simulation clients also read `<identity>.pem` here; needed when `required`",
    "simulation.cpus_per_client": "Ray CPUs per simulated client",
    "simulation.gpus_per_client": "Ray GPUs per simulated client",
    "simulation.ray_address": "an existing Ray cluster (`ray start --head`), empty for a local one",
}
