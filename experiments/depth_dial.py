"""Accuracy vs test-time iterations: a `recurrent` model against a 16-layer `transformer`.

Both models train on k-hop pointer chasing (``pointer_chase``); the recurrent one samples its
iteration count r per step, and is then scored at each r of ``--iterations`` on the
in-distribution (``val``: 1..max_size hops) and out-of-distribution (``test``: up to ood_size
hops) splits. The transformer's depth is fixed, so it is one point per split. Parameter counts
go into the results: the question is whether a dial over one small core matches a deep stack.

    python experiments/depth_dial.py --out runs/depth-dial                 # CPU, ~3 min on 2 free cores
    python experiments/depth_dial.py --out runs/depth-dial --steps 6000 --dim 128 --batch 128 \
        --nodes 12 --max-hops 4 --ood-hops 8 --transformer-layers 16 --iterations 1 2 4 8 16 32   # GPU

CPU defaults (dim 64, 5 nodes, 16 queries, hops 1..2 trained with weights 1 : 0.3
(``--size-decay``), 800 steps; chance 0.2), measured: recurrent (170,816 params) in-distribution
0.83 / 0.85 / 0.85 / 0.85 / 0.85 at r = 1 / 2 / 4 / 8 / 16 (1 hop 0.99, 2 hops 0.68), OOD
(3-4 hops) 0.13 at every r; 4-layer transformer (215,744 params) in-distribution 0.87, OOD 0.26.
So both learn, but at this size the dial is flat: prelude + one core pass + coda already make
two lookups at r = 1, and nothing extrapolates. 4.9 min wall, the first half shared with another
job; alone ~3 min. What made it learn: fewer nodes (5 instead of 8; at 8 nodes, hops 1..3 with
the same curriculum, recurrent and 4-layer transformer were still at chance after 400 steps),
16 queries per sequence, and the hop curriculum (``size_decay``). At 5 nodes the 4-layer
transformer went 0.25 -> 0.48 -> 0.80 -> 0.91 at steps 200..800 (1 hop first, then 2).
Backprop through 4 iterations instead of 2 was slower (0.31 vs 0.53 at step 400).
Chain-of-hops supervision was not adopted: in a causal sequence an intermediate answer placed
before the final one turns the k-hop answer into a 1-hop lookup from it (the depth no longer
grows with k), and placed after it, it only adds 1-hop supervision, which ``size_decay`` gives.

The GPU command is the issue's question: hops 1..4 in distribution and 5..8 out, enough hops
that one core pass cannot cover them, and the 16-layer baseline. Run on an H100 at 4000 steps
(BENCHMARKS.md): recurrent ID 0.40 at every r (1 hop 1.00, 2 hops 0.44), 16-layer transformer
0.56, both at chance out of distribution; the dial stays flat. ``--task chain_root`` asks for
the root of a node's chain instead (a fixed point of following: no count to read, and more
iterations than the depth change nothing). On CPU, with truncated backprop, the recurrent
model did not learn it (0.5, one of the two roots); gradient must reach the first iteration:
``--sampling fixed --train-iterations 2 --backprop-depth 0`` matched a 4-layer transformer in
distribution at r = 2 and got worse with more iterations (BENCHMARKS.md).
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from common import parser, run_main, save_figure, score, train_run, write_json


def main() -> None:
    p = parser(__doc__.splitlines()[0], steps=800)
    p.add_argument("--task", default="pointer_chase", choices=["pointer_chase", "chain_root"],
                   help="k-hop chasing with the count given, or the root of a chain (a fixed point)")
    p.add_argument("--chains", type=int, default=2, help="chain_root: chains per sequence")
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--queries", type=int, default=16, help="queries per sequence (answer tokens)")
    p.add_argument("--max-hops", type=int, default=2)
    p.add_argument("--ood-hops", type=int, default=4)
    p.add_argument("--size-decay", type=float, default=0.3,
                   help="training hop count k weighted by size_decay**(k-1) (static curriculum; 1 = uniform)")
    p.add_argument("--train-iterations", type=int, default=4, help="mean r while training")
    p.add_argument("--backprop-depth", type=int, default=2, help="recurrent: iterations trained with gradient (0: all)")
    p.add_argument("--sampling", default="poisson_lognormal", choices=["poisson_lognormal", "uniform", "fixed"],
                   help="recurrent: how r is drawn per training step (fixed: --train-iterations)")
    p.add_argument("--supervise-iterations", action="store_true",
                   help="recurrent: train the prediction after every live iteration, not only the last")
    p.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--transformer-layers", type=int, default=4, help="baseline depth (16 on a GPU; 4 keeps the CPU run short)")
    args = p.parse_args()
    data = {"name": args.task, "nodes": args.nodes, "queries": args.queries,
            "max_size": args.max_hops, "ood_size": args.ood_hops, "size_decay": args.size_decay}
    if args.task == "chain_root":
        data["chains"] = args.chains
    heads = max(1, args.dim // 32)
    recurrent = {"name": "recurrent", "d_model": args.dim, "n_heads": heads, "mean_iterations": args.train_iterations,
                 "max_iterations": 4 * args.train_iterations, "backprop_depth": args.backprop_depth,
                 "iterations": args.sampling, "supervise_iterations": args.supervise_iterations}
    transformer = {"name": "transformer", "d_model": args.dim, "n_heads": heads, "n_layers": args.transformer_layers}

    results = {"config": vars(args) | {"out": str(args.out)}, "recurrent": {"by_iterations": []}, "transformer": {}}
    summary, run = train_run(args, "recurrent", {"model": recurrent, "data": data})
    results["recurrent"]["parameters"] = summary["parameters"]
    for r in args.iterations:
        run.model.config.test_iterations = r
        point = {"iterations": r, "in_distribution": score(run, run.source, "val", args),
                 "out_of_distribution": score(run, run.source, "test", args)}
        results["recurrent"]["by_iterations"].append(point)
        print(f"recurrent r={r:>3}  ID acc {point['in_distribution']['token_accuracy']:.3f}  "
              f"OOD acc {point['out_of_distribution']['token_accuracy']:.3f}")
    summary, run = train_run(args, "transformer", {"model": transformer, "data": data})
    results["transformer"] = {"parameters": summary["parameters"], "layers": args.transformer_layers,
                              "in_distribution": score(run, run.source, "val", args),
                              "out_of_distribution": score(run, run.source, "test", args)}
    t = results["transformer"]
    print(f"transformer ({args.transformer_layers} layers)  ID acc {t['in_distribution']['token_accuracy']:.3f}  "
          f"OOD acc {t['out_of_distribution']['token_accuracy']:.3f}")
    print(f"parameters: recurrent {results['recurrent']['parameters']:,}  transformer {t['parameters']:,}")
    write_json(args.out / "results.json", results)

    fig, ax = plt.subplots(figsize=(6, 4))
    rs = [pt["iterations"] for pt in results["recurrent"]["by_iterations"]]
    for split, colour in (("in_distribution", "tab:blue"), ("out_of_distribution", "tab:red")):
        acc = [pt[split]["token_accuracy"] for pt in results["recurrent"]["by_iterations"]]
        ax.plot(rs, acc, "o-", color=colour, label=f"recurrent, {split.replace('_', ' ')}")
        ax.axhline(t[split]["token_accuracy"], color=colour, ls="--",
                   label=f"{args.transformer_layers}-layer transformer, {split.replace('_', ' ')}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test-time iterations r")
    ax.set_ylabel("answer token accuracy")
    ax.set_title(f"depth dial ({results['recurrent']['parameters']:,} vs {t['parameters']:,} params)")
    ax.legend(fontsize=7)
    save_figure(fig, args.out / "accuracy_vs_iterations.png")


if __name__ == "__main__":
    run_main(main)
