"""Accuracy vs test-time iterations: a `recurrent` model against a 16-layer `transformer`.

Both models train on k-hop pointer chasing (``pointer_chase``); the recurrent one samples its
iteration count r per step, and is then scored at each r of ``--iterations`` on the
in-distribution (``val``: 1..max_size hops) and out-of-distribution (``test``: up to ood_size
hops) splits. The transformer's depth is fixed, so it is one point per split. Parameter counts
go into the results: the question is whether a dial over one small core matches a deep stack.

    python experiments/depth_dial.py --out runs/depth-dial                 # tiny, CPU
    python experiments/depth_dial.py --out runs/depth-dial --steps 3000 --dim 128 --batch 128 \
        --nodes 8 --max-hops 2 --ood-hops 6 --iterations 1 2 4 8 16 32     # GPU

Pointer chasing has a long chance plateau before the lookup circuit forms. On CPU (dim 64,
8 queries, 8 nodes) a 2-layer transformer learned 1-hop chasing to 0.71 in 400 steps at the
default lr 3e-3 (0.29 at lr 1e-3); with hops 1..2 neither a 4-layer transformer nor the
recurrent model left the plateau within 400-800 steps, so at 16 nodes / 4 hops expect to need
many thousands of steps (or a curriculum on ``--max-hops``).
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from common import parser, run_main, save_figure, score, train_run, write_json


def main() -> None:
    p = parser(__doc__.splitlines()[0], steps=600)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--queries", type=int, default=8, help="queries per sequence (answer tokens)")
    p.add_argument("--max-hops", type=int, default=2)
    p.add_argument("--ood-hops", type=int, default=4)
    p.add_argument("--train-iterations", type=int, default=4, help="mean r while training")
    p.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--transformer-layers", type=int, default=16)
    args = p.parse_args()
    data = {"name": "pointer_chase", "nodes": args.nodes, "queries": args.queries,
            "max_size": args.max_hops, "ood_size": args.ood_hops}
    heads = max(1, args.dim // 32)
    recurrent = {"name": "recurrent", "d_model": args.dim, "n_heads": heads, "mean_iterations": args.train_iterations,
                 "max_iterations": 4 * args.train_iterations}
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
