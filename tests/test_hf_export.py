"""Hugging Face export contracts: same logits, same greedy tokens, tied weights, self-contained."""

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face export needs the 'hf' extra")

from parallax.checkpoint import load_run, save_checkpoint  # noqa: E402
from parallax.cli.main import main  # noqa: E402
from parallax.config import RunConfig  # noqa: E402
from parallax.data import build_data  # noqa: E402
from parallax.generation import generate  # noqa: E402
from parallax.hf.export import export_hf, rename_package  # noqa: E402
from parallax.models import build_model  # noqa: E402
from parallax.train.trainer import bind_data_shapes  # noqa: E402

TINY = {
    "transformer": ["model.d_model=32", "model.n_heads=2", "model.n_layers=1"],
    "swap": ["model.n_embd=32", "model.n_layer=1", "model.n_head=2", "model.n_kv_heads=1"],
    "cws": ["model.d_model=32", "model.n_heads=2", "model.mlp_hidden=32", "model.siren_hidden=32",
            "model.probe_head_dim=8", "model.decoder_heads=2", "model.k_max=3", "model.halt_tol=0.6"],
    "recurrent": ["model.d_model=32", "model.n_heads=2", "model.mean_iterations=2", "model.test_iterations=3"],
    "eam": [],
}
SORT = ["data.name=sort", "data.length=5", "data.vocab=8"]  # 11 ids, context 11


def write_run(path, name, data=SORT):
    """A run directory as the trainer writes it, with weights spread out so that greedy
    decoding does not repeat one token (the CWS only its embedding and decoder: large random
    SSM and SIREN weights make it chaotic, so incremental and full decoding drift apart)."""
    cfg = RunConfig.from_dict({}, [f"model.name={name}", *TINY[name], *data])
    bind_data_shapes(cfg, build_data(cfg.data))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for key, p in model.named_parameters():
        if name != "cws" or key.startswith(("embed", "decoder")):
            torch.nn.init.normal_(p, std=1.0 if name == "cws" else 0.3)
    path.mkdir(parents=True)
    (path / "config.json").write_text(cfg.to_json())
    save_checkpoint(path, 1, model, name, {"step": 1})
    return path


@pytest.mark.parametrize("name", ["transformer", "swap", "cws", "recurrent"])
def test_export_round_trip(tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = write_run(tmp_path / "run", name)
    out, has_tokenizer = export_hf(run, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    parallax_model = load_run(run).model

    assert hf.get_input_embeddings().weight is hf.get_output_embeddings().weight
    assert hf.get_input_embeddings().weight.data_ptr() == hf.get_output_embeddings().weight.data_ptr()
    assert not type(hf.model).__module__.startswith("parallax.")  # built from the bundled source

    ids = torch.randint(0, 11, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, parallax_model(ids).logits, rtol=1e-4, atol=1e-5)

    prompt = tokenizer("<s> 3 1 4 |").input_ids
    assert has_tokenizer and prompt == [1, 6, 4, 7, 2]
    expected = [t.id for t in generate(parallax_model, prompt, 12, temperature=0)]  # 17 > context 11
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    assert got == expected and len(set(expected)) > 1


def test_text_run_ships_its_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parallax.data.prepare import prepare_corpus, read_text_files
    from parallax.data.tokenizer import END_OF_TEXT

    words = "the cat dog sat ran on a mat hill big small red blue sun moon".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + "." for i in range(40)]
    (tmp_path / "t.txt").write_text("".join(f"{d}\n{END_OF_TEXT}\n" for d in docs))
    prepare_corpus(read_text_files([tmp_path / "t.txt"]), tmp_path / "data", vocab_size=280,
                   val_fraction=0.2, progress=False)
    run = write_run(tmp_path / "run", "transformer", ["data.name=text", f"data.path={tmp_path / 'data'}",
                                                      "data.seq_len=16"])
    out, _ = export_hf(run, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    loaded = load_run(run)
    text = "the big red cat sat"
    prompt = loaded.source.tokenizer.encode(text)
    assert tokenizer(text).input_ids == prompt and tokenizer.decode(prompt) == text
    assert hf.config.eos_token_id == loaded.source.tokenizer.eot_id
    eot = loaded.source.tokenizer.eot_id
    expected = [t.id for t in generate(loaded.model, prompt, 20, temperature=0, stop_id=eot)]
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert got == expected


def test_export_loads_without_parallax_installed(tmp_path):
    """The remote code needs only torch and transformers: parallax is blocked in the child."""
    run = write_run(tmp_path / "run", "cws")
    out, _ = export_hf(run, tmp_path / "hf")
    ids = [[1, 6, 4, 7, 2]]
    with torch.no_grad():
        expected = load_run(run).model(torch.tensor(ids)).logits[0, -1].tolist()
    code = (
        "import sys, json, torch; sys.modules['parallax'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"print(json.dumps(m(torch.tensor({ids})).logits[0, -1].tolist()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-5)


def test_export_command_and_eam_refusal(tmp_path, capsys):
    run = write_run(tmp_path / "run", "recurrent")
    assert main(["export", str(run), "model.test_iterations=5", "--hf", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["parallax_config"]["test_iterations"] == 5 and config["model_type"] == "parallax_recurrent"
    assert main(["export", str(run), "train.steps=5", "--hf", str(tmp_path / "hf2")]) == 2  # model.* only
    assert "model.KEY=VALUE overrides only" in capsys.readouterr().err and not (tmp_path / "hf2").exists()

    eam = write_run(tmp_path / "eam", "eam")
    assert main(["export", str(eam), "--hf", str(tmp_path / "no")]) == 1
    assert "masked denoiser" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_rename_package_touches_code_only():
    source = 'import parallax.models\nfrom parallax.x import y  # parallax\ns = "parallax"; parallax.models.z\n'
    assert rename_package(source, "pkg") == 'import pkg.models\nfrom pkg.x import y  # parallax\ns = "parallax"; pkg.models.z\n'
