"""Bytes per round of the factored vs dense transport, measured from the engine's own payload tensors.

Run on demand (not part of the test suite), from the repository root:

    .venv/bin/python benchmarks/bytes_per_round.py                      # r=4, 16 clients, all three models
    .venv/bin/python benchmarks/bytes_per_round.py --ranks 4 8 16 --clients 16
    .venv/bin/python benchmarks/bytes_per_round.py --models stories260K --clients 2 --out /tmp/b.json

For each model shape (stories260K, GPT-2 medium, LLaMA2-7B), built from a config with no weights on the
meta device, and each LoRA rank r on all of q, k, v, o in every layer (the engine's `uniform_plan`), it
builds meta-device factors B [out, r], A [r, in] for N clients and runs them through the same functions
the round engine (`fedpipe_dist/runtime/exchange.py`, `factored_exchange` / `dense_exchange`) uses:

  factored  per-client upload   pack(factors, factor_layout)
            download payload    pack(aggregate_factored(all N), stacked_layout over the N plans), or its
                                dense product when that is smaller (comm.payload.downlink_is_dense)
  dense     per-client upload   pack_dense(dense_sum([that client]), dense_layout over its adapted sites)
            download payload    pack_dense(dense_sum(all N), dense_layout over the union of adapted sites)

Every byte count is numel * element_size of the resulting (meta) tensor, i.e. what would go on the wire.
Round totals follow the engine's HDF5 row: bytes_up = sum of per-client uploads, bytes_down = download
payload * N (every server receives the merged update). Each count is also checked against the formula the
engine records (layout_numel * 4 and 4 * sum of site numel); a disagreement is reported on stderr and in
the JSON (`engine_formula_agrees`).

stories260K's config is the built-in LlamaConfig below unless `--stories-path DIR` (or the environment
variable FEDPIPE_SHARED_DATA) names a folder holding models/stories260K-hf/config.json, which is then
loaded with transformers.AutoConfig. Output: a Markdown table on stdout and JSON at `--out`
(default benchmarks/out/bytes_per_round.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from benchmarks._jobs import write_json  # noqa: E402
from fedpipe_dist.adapters.sites import KINDS, find_sites, n_layers  # noqa: E402
from fedpipe_dist.algorithm.aggregation import (  # noqa: E402
    ClientUpdate,
    aggregate_factored,
    aggregation_weights,
    dense_sum,
    factored_to_dense,
)
from fedpipe_dist.algorithm.planner import uniform_plan  # noqa: E402
from fedpipe_dist.comm.base import nbytes  # noqa: E402
from fedpipe_dist.comm.payload import (  # noqa: E402
    dense_layout,
    downlink_is_dense,
    factor_layout,
    layout_numel,
    pack,
    pack_dense,
    stacked_layout,
)
from fedpipe_dist.models import model_from_config  # noqa: E402

MODELS = ("stories260K", "gpt2-medium", "llama2-7b")
DEFAULT_OUT = REPO / "benchmarks" / "out" / "bytes_per_round.json"
STORIES_REL = Path("models") / "stories260K-hf" / "config.json"
META = torch.device("meta")


# ---- model configs (no weights) ---------------------------------------------------------------------------


def stories_config(stories_path: str | None):
    """(config, source): the shared stories260K-hf config when available, else the built-in equivalent."""
    from transformers import AutoConfig, LlamaConfig

    root = stories_path or os.environ.get("FEDPIPE_SHARED_DATA")
    if root:
        cfg_file = Path(root) / STORIES_REL
        if cfg_file.is_file():
            return AutoConfig.from_pretrained(cfg_file.parent), str(cfg_file)
        print(f"note: {cfg_file} not found; using the built-in stories260K config", file=sys.stderr)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=172, vocab_size=512, tie_word_embeddings=True)
    return cfg, "built-in LlamaConfig"


def model_config(name: str, stories_path: str | None):
    from transformers import GPT2Config, LlamaConfig

    if name == "stories260K":
        return stories_config(stories_path)
    if name == "gpt2-medium":
        return GPT2Config(n_embd=1024, n_layer=24, n_head=16), "built-in GPT2Config"
    if name == "llama2-7b":
        return (LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=32, intermediate_size=11008, vocab_size=32000),
                "built-in LlamaConfig")
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


# ---- one measurement --------------------------------------------------------------------------------------


def measure(sites, rank: int, n_clients: int) -> dict:
    """Bytes of the factored and dense payloads for one round with all `n_clients` servers contributing."""
    plans = uniform_plan(sites, n_clients, targets=list(KINDS), rank=rank, batch_size=1)
    contributors = list(range(n_clients))
    weights = aggregation_weights([1] * n_clients, [p.batch_size for p in plans])
    by_key = {s.key: s for s in sites}
    updates = []
    for c in contributors:
        factors = {k: (torch.empty(by_key[k].out_features, r, device=META),
                       torch.empty(r, by_key[k].in_features, device=META))
                   for k, r in plans[c].ranks.items() if r > 0}
        updates.append(ClientUpdate(c, 1, plans[c].batch_size, factors))

    # factored (mirrors factored_exchange)
    f_up = {}
    f_up_engine = {}
    for c in contributors:
        layout = factor_layout(sites, plans[c].ranks)
        f_up[c] = nbytes(pack(updates[c].factors, layout, device=META))
        f_up_engine[c] = layout_numel(layout) * 4
    down_layout = stacked_layout(sites, [plans[c].ranks for c in contributors])
    stacked = aggregate_factored(updates, weights)
    if downlink_is_dense(down_layout):  # the engine then sends the stack's dense product (smaller, exact)
        d_keys = dense_layout(sites, {k for k, _, _ in down_layout})
        f_down = nbytes(pack_dense(factored_to_dense(stacked), d_keys, device=META))
        f_down_engine = 4 * sum(o * i for _, (o, i) in d_keys)
    else:
        f_down = nbytes(pack(stacked, down_layout, device=META))
        f_down_engine = layout_numel(down_layout) * 4

    # dense (mirrors dense_exchange; per-client upload = that client's own dense dW over its adapted sites)
    d_up = {}
    d_up_engine = {}
    for c in contributors:
        keys = {k for k, r in plans[c].ranks.items() if r > 0}
        d_up[c] = nbytes(pack_dense(dense_sum([updates[c]], [weights[c]]), dense_layout(sites, keys),
                                    device=META))
        d_up_engine[c] = 4 * sum(by_key[k].numel for k in keys)
    all_keys = {k for c in contributors for k, r in plans[c].ranks.items() if r > 0}
    d_layout = dense_layout(sites, all_keys)
    d_down = nbytes(pack_dense(dense_sum(updates, weights), d_layout, device=META))
    d_down_engine = 4 * sum(o * i for _, (o, i) in d_layout)

    def block(up: dict, down: int) -> dict:
        bytes_up, bytes_down = sum(up.values()), down * n_clients
        per_client = sorted(set(up.values()))
        return {"client_up_bytes": per_client[0] if len(per_client) == 1 else per_client,
                "down_payload_bytes": down, "round_bytes_up": bytes_up, "round_bytes_down": bytes_down,
                "round_bytes_total": bytes_up + bytes_down}

    # FedPipe's kept adapter (lora.carry=adapter): every rank reads each server's factors back, so the stack
    # always travels factored (aggregator.raw_stack), never as its dense product
    kept = block(f_up, layout_numel(down_layout) * 4)
    # lora.carry=shared_a (mirrors FedPipe._exchange_b over fedavg_exchange): each server's change of B at the top
    # rank on every adapted weight goes up as fp32, their weighted sum comes down in the same layout
    b_numel = sum(by_key[k].out_features * rank for k in sorted(all_keys))
    b_change = torch.cat([torch.empty(by_key[k].out_features * rank, device=META) for k in sorted(all_keys)])
    shared = block({c: nbytes(b_change) for c in contributors}, nbytes(b_change))
    agrees_shared = nbytes(b_change) == 4 * b_numel

    fac, den = block(f_up, f_down), block(d_up, d_down)
    agrees = (f_up == f_up_engine and f_down == f_down_engine
              and d_up == d_up_engine and d_down == d_down_engine)
    adapted = [s for s in sites if s.key in all_keys]
    return {
        "rank": rank, "n_clients": n_clients, "adapted_sites": len(adapted),
        "adapted_weight_numel": sum(s.numel for s in adapted),
        "factored": fac, "dense": den, "kept_adapter_stack": kept, "shared_a": shared,
        "ratio_dense_over_factored": {
            "client_up": den["round_bytes_up"] / fac["round_bytes_up"],
            "down_payload": den["down_payload_bytes"] / fac["down_payload_bytes"],
            "round_total": den["round_bytes_total"] / fac["round_bytes_total"],
        },
        "engine_formula_agrees": agrees and agrees_shared,
    }


# ---- output -----------------------------------------------------------------------------------------------


def human(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def markdown_table(rows: list[dict]) -> str:
    head = ("| model | sites | r | N | factored up/client | dense up/client | factored down payload "
            "| dense down payload | factored round (up+down) | dense round (up+down) | dense/factored up "
            "| dense/factored down | dense/factored round | kept adapter round (stack, lora.carry=adapter) "
            "| shared A round (lora.carry=shared_a) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f, d, q = r["factored"], r["dense"], r["ratio_dense_over_factored"]
        lines.append(
            f"| {r['model']} | {r['adapted_sites']} | {r['rank']} | {r['n_clients']} "
            f"| {human(f['client_up_bytes'])} | {human(d['client_up_bytes'])} "
            f"| {human(f['down_payload_bytes'])} | {human(d['down_payload_bytes'])} "
            f"| {human(f['round_bytes_total'])} | {human(d['round_bytes_total'])} "
            f"| {q['client_up']:.2f}x | {q['down_payload']:.2f}x | {q['round_total']:.2f}x "
            f"| {human(r['kept_adapter_stack']['round_bytes_total'])} | {human(r['shared_a']['round_bytes_total'])} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[4],
                   help="LoRA rank(s) on every q,k,v,o (default 4)")
    p.add_argument("--clients", type=int, default=16, help="servers per round, all contributing (default 16)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                   help="model shapes to measure (default: all)")
    p.add_argument("--stories-path", default=None,
                   help="folder holding models/stories260K-hf/config.json (default: $FEDPIPE_SHARED_DATA)")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)})")
    args = p.parse_args(argv)
    if args.clients < 1 or any(r < 1 for r in args.ranks):
        p.error("--clients and --ranks must be >= 1")
    return args


def main(argv=None) -> dict:
    """Measure, print the Markdown table, write the JSON; returns the JSON document."""
    args = parse_args(argv)
    rows = []
    for name in args.models:
        config, source = model_config(name, args.stories_path)
        sites = find_sites(model_from_config(config))
        for rank in args.ranks:
            row = {"model": name, "config_source": source, "n_sites": len(sites), "n_layers": n_layers(sites)}
            row.update(measure(sites, rank, args.clients))
            if not row["engine_formula_agrees"]:
                print(f"warning: {name} r={rank}: payload bytes differ from the engine's recorded formula",
                      file=sys.stderr)
            rows.append(row)
    doc = {
        "benchmark": "bytes_per_round",
        "command": " ".join(["benchmarks/bytes_per_round.py"]
                            + (list(argv) if argv is not None else sys.argv[1:])),
        "dtype": "float32 (the engine's wire dtype)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "results": rows,
    }
    print(markdown_table(rows))
    out = write_json(args.out, doc, indent=2)
    print(f"\nJSON: {out}")
    return doc


if __name__ == "__main__":
    main()
