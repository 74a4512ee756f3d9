"""Continue a prompt with a trained text model, streaming tokens as they are sampled.

With --show-k each generated token is printed on a background colour that grades the
iterations the model spent on it (dark purple = few, yellow = many), after a legend line.
That needs a model that reports per-token iterations (``k_used``), such as cws.

example:
  parallax generate runs/ts --prompt "Once upon a time" --show-k
"""

from __future__ import annotations

import sys

from parallax.cli.commands import positive_int

HELP = "sample text from a trained run"

# ANSI 256-colour (background, foreground) pairs from few iterations to many
K_COLOURS = ((53, 231), (54, 231), (61, 231), (67, 231), (72, 231), (107, 16), (149, 16), (227, 16))
FALLBACK_K_MAX = 32  # colour scale top (larger K are clamped) for configs without k_max


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `parallax train`")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter")
    parser.add_argument("--top-p", type=float, default=0.95, help="1 = no nucleus filter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--show-k", action="store_true", help="colour tokens by the iterations they took")
    parser.add_argument(
        "--cuda-graph", action="store_true",
        help="replay each token's step from a CUDA graph (CUDA only; a CWS then runs k_max iterations per token)",
    )


def k_colour(k: int, k_min: int, k_max: int) -> tuple[int, int]:
    """The (background, foreground) pair for ``k`` on a scale from ``k_min`` to ``k_max``."""
    span = max(k_max - k_min, 1)
    index = round((min(max(k, k_min), k_max) - k_min) / span * (len(K_COLOURS) - 1))
    return K_COLOURS[index]


def paint(text: str, colour: tuple[int, int]) -> str:
    return f"\033[48;5;{colour[0]}m\033[38;5;{colour[1]}m{text}\033[0m"


def legend(k_min: int, k_max: int) -> str:
    """One line showing which K values each colour stands for."""
    groups: list[tuple[tuple[int, int], int, int]] = []
    for k in range(k_min, k_max + 1):
        colour = k_colour(k, k_min, k_max)
        if groups and groups[-1][0] == colour:
            groups[-1] = (colour, groups[-1][1], k)
        else:
            groups.append((colour, k, k))
    cells = [paint(f" {a} " if a == b else f" {a}-{b} ", c) for c, a, b in groups]
    return "K: " + "".join(cells)


def run(args) -> int:
    from parallax.checkpoint import load_run
    from parallax.errors import ParallaxError
    from parallax.generation import first_row, generate_batch
    from parallax.train.runtime import resolve_device

    loaded = load_run(args.run_dir, device=resolve_device(args.device))
    tokenizer = getattr(loaded.source, "tokenizer", None)
    if tokenizer is None:
        raise ParallaxError(
            f"run {args.run_dir!r} was trained on data {loaded.config.data_name!r}, which has no tokenizer; "
            "generate needs a run trained on text"
        )
    cfg = loaded.model.config
    k_min = getattr(cfg, "k_min", 1)
    k_max = getattr(cfg, "k_max", FALLBACK_K_MAX)
    out = sys.stdout
    generated: list[int] = []
    shown = ""  # text of `generated` already printed

    def show(step: int, token, k, finished) -> bool:
        """Print one streamed token (reading it is this command's per-token sync); True at the end of text."""
        nonlocal shown
        sampled = first_row(token, k)
        token_id, token_k = sampled.id, sampled.k
        if step == 0 and args.show_k and token_k is None:
            print(
                f"note: the {loaded.config.model_name!r} model does not report per-token iterations "
                "(k_used); --show-k has nothing to colour",
                file=sys.stderr,
            )
        if step == 0:
            out.write((legend(k_min, k_max) + "\n" if args.show_k and token_k is not None else "") + args.prompt)
        generated.append(token_id)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):  # else a character split across tokens: wait for its last byte
            piece, shown = text[len(shown) :], text
            out.write(paint(piece, k_colour(token_k, k_min, k_max)) if args.show_k and token_k is not None else piece)
            out.flush()
        return token_id == tokenizer.eot_id

    generate_batch(
        loaded.model,
        tokenizer.encode(args.prompt),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_id=tokenizer.eot_id,
        on_token=show,
        cuda_graph=args.cuda_graph,
    )
    out.write("\n")
    return 0
