"""Names and shapes in results.h5 (see docs/hdf5_schema.md). Analysis code reads these names only."""

# 2: absorbed_min, absorbed, extra_bytes_per_param, base_weight_bytes; 3: adapter_depth/width; 4: agg_peak/held_bytes;
# 5: update_norm, rejected, n_rejected; 6: root attrs run_id, resumed_from (checkpoints and resume);
# 7: eval_s (so that time to quality can leave evaluation out); 8: eval_loss_se, eval_tokens, eval/full_*, the
# round's phases (plan_s ... record_s), recv_wait_s (wait_s is now the straggler wait), root attrs setup_s,
# setup_phases_json, checkpoint_s, finish_s
SCHEMA_VERSION = 8

ROOT_ATTRS = ("schema_version", "method", "model", "dataset", "world_size", "n_clients", "config_json",
              "finished", "eval_precision", "base_params", "run_id")  # + resumed_from, once resumed

# rounds/: one row per completed round. Row 0 is the base model before any training (eval only).
ROUND_FIELDS = {
    "round": "i4",
    "wall_s": "f8",  # wall-clock of the round on rank 0 (plan, local training, exchange, merge, eval)
    "eval_s": "f8",  # the round's evaluation on rank 0 (part of wall_s; not training: time-to-quality leaves it out)
    # rank 0's wall_s by phase (they add up to wall_s, less the append of the row itself):
    "plan_s": "f8",  # sampling and planning (profiles and importance all-gathered)
    "train_s": "f8",  # local training of rank 0's own servers
    "sync_s": "f8",  # waiting for every rank's report: the straggler wait of the round's slowest rank
    "exchange_s": "f8",  # the method's exchange of the updates (its agg_s and wait_s below are parts of it)
    "merge_s": "f8",  # the method's end of round and the merge into every base
    "record_s": "f8",  # gathering every rank's statistics and building the row
    "agg_s": "f8",  # rank 0's aggregation compute (stacking or dense sum, packing)
    # the straggler wait: the longest any rank waited, after training its servers, for the slowest rank to
    # finish (measured around the all-gather of the servers' reports, where the wait happens)
    "wait_s": "f8",
    "recv_wait_s": "f8",  # rank 0's time blocked on receives inside the exchange (the updates' arrival)
    "train_loss": "f8",  # mean over completed clients of their mean local training loss
    "eval_loss": "f8",  # mean target-token cross-entropy on the eval set (NaN when not evaluated)
    "eval_ppl": "f8",
    "eval_loss_se": "f8",  # standard error of eval_loss over the sampled examples (ratio estimator; NaN: none)
    "eval_tokens": "i8",  # target tokens eval_loss averages over (0 when not evaluated)
    "bytes_up": "i8",  # payload bytes of all client uploads this round
    "bytes_down": "i8",  # payload bytes of the merged update times the servers that receive it
    "n_selected": "i4",
    "under_training_rate": "f8",  # fraction of selected servers that did not complete their plan
    "absorbed_min": "f8",  # lowest absorbed fraction over the bases in use this round (NaN: nothing merged)
    # rank 0's peak memory from the end of local training to the merge (exchange, aggregation, broadcast,
    # merge): CUDA peak allocated, or the process's resident peak (VmHWM) on CPU
    "agg_peak_bytes": "i8",
    # factored exchange: the most update bytes rank 0 held at once while folding updates in (the running
    # aggregate + the update in hand); holding every update instead would be sum of bytes_up
    "agg_held_bytes": "i8",
    "n_rejected": "i4",  # updates left out by sanitization (not finite, norm outlier, or not the norm claimed)
}

# clients/: arrays [round row, client].
CLIENT_FIELDS = {
    "selected": "i1",
    "completed": "i1",
    "batch_size": "i4",
    "local_steps": "i4",
    "samples": "i8",  # training examples processed this round
    "local_s": "f8",  # local training wall-clock (slowdown waits included)
    "wait_s": "f8",  # idle until the slowest selected server finished: max_j local_s_j - local_s_i
    "peak_mem_bytes": "i8",  # CUDA: peak allocated during local training; CPU: process peak RSS
    "trainable_params": "i8",
    "quant_bits": "i4",  # bits per base weight (32 fp32, 16 fp16/bf16, 8 nf8, 4 nf4)
    "bytes_up": "i8",
    "train_loss": "f8",
    "pred_step_s": "f8",  # the cost model's step time for the plan (FLOPs / measured speed)
    "pred_mem_bytes": "i8",  # the memory model's peak for the plan
    # Share of the round's merged update ||dW||^2 that this server's stored weights took up:
    # 1 - ||(W_after - W_before) - dW||^2 / ||dW||^2 over all adapted sites (NaN when not measured).
    "absorbed": "f8",
    "extra_bytes_per_param": "f8",  # the merged-update residual's bytes / base parameters (0 for fp32)
    "adapter_depth": "i4",  # fedadapter: top layers with Houlsby adapters this server trained (0: other methods)
    "adapter_width": "i4",  # fedadapter: their bottleneck width
    "update_norm": "f8",  # Frobenius norm of the server's update as it reported it (NaN: none, or not finite)
    "rejected": "i1",  # 1: sanitization left the update out (completed stays 1: the server did its work)
    # the global model's eval loss on this server's own mix of partition keys (eval examples reweighted to
    # it: metrics.perplexity.reweighted_losses); NaN in rounds not evaluated. Added within schema 8: a file
    # written before it gains the column when resumed, its earlier rows NaN
    "eval_loss_own": "f8",
    "eval_own_coverage": "f8",  # the share of the server's data whose keys the eval sample holds (same addition)
    # the global model's eval loss on the server's held-out own examples (data.own_eval_samples; NaN without
    # them or in rounds not evaluated; same addition)
    "eval_loss_heldout": "f8",
}
CLIENT_LAYER_FIELDS = {"ranks": "i4", "importance": "f8"}  # [round row, client, layer, 4] (q, k, v, o)

PROFILE_FIELDS = {"tflops": "f8", "mem_budget_bytes": "i8", "slowdown": "f8",
                  "base_weight_bytes": "i8"}  # measured storage of the server's base at its precision

PRECISION_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "nf8": 8, "nf4": 4}
