"""Export a run for other tools: a Hugging Face model folder.

The folder loads with torch and transformers alone (the parallax source travels in it):

  parallax export runs/ts --hf hf/ts
  python -c "from transformers import AutoModelForCausalLM, AutoTokenizer
  model = AutoModelForCausalLM.from_pretrained('hf/ts', trust_remote_code=True)
  tok = AutoTokenizer.from_pretrained('hf/ts', trust_remote_code=True)
  ids = tok('Once upon a time', return_tensors='pt').input_ids
  print(tok.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))"

Greedy generate() gives the tokens of `parallax generate --temperature 0`. Causal models
only (cws, recurrent, swap, transformer); eam is a masked denoiser. Text runs ship their
BPE tokenizer; synthetic tasks a word-level tokenizer over their symbol names (prompts are
space-separated symbols, e.g. "<s> 3 1 |"). `model.KEY=VALUE` overrides, right after RUN_DIR,
change test-time knobs of the exported model: parallax export RUN_DIR model.k_max=16 --hf OUT.
Pass trust_remote_code=True to AutoTokenizer too: it reads config.json, whose classes are
remote code. Needs the extra: pip install 'parallax[hf]'.
"""

from __future__ import annotations

from parallax.cli.commands import only_sections

HELP = "export a run as a Hugging Face model folder"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `parallax train`")
    parser.add_argument("--hf", required=True, metavar="OUT_DIR", help="folder to write the Hugging Face model to")
    parser.add_argument("overrides", nargs="*", metavar="model.KEY=VALUE", help="test-time config overrides")


def run(args) -> int:
    only_sections(args.overrides, ("model",), "export")  # before the hf extra is needed
    from parallax.hf.export import export_hf

    out, has_tokenizer = export_hf(args.run_dir, args.hf, args.overrides)
    print(f"wrote {out}  (load with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True))")
    if not has_tokenizer:
        print("note: this run's data has no tokenizer and no one-word symbol names; the folder has no tokenizer")
    return 0
