"""WikiText-2 loading and perplexity: ours against transformers on the same windows and protocol."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import SMOLLM2_LOGITS_BOUND, TINY_NLL_BOUND

from llama_surgery_jax.evaluate import main
from llama_surgery_jax.evaluation.perplexity import perplexity
from llama_surgery_jax.io import corpora
from llama_surgery_jax.model.checkpoint import load_model, load_tokenizer

# SmolLM2 through both stacks in float32 from the same dequantized GGUF weights: torch and XLA order every sum
# differently, so the logits agree to SMOLLM2_LOGITS_BOUND (conftest: 3.6e-4, in RMS). Per token the NLL moves by
# Δlog-sum-exp − Δ(target logit), each of the size of a typical logit error: |Δ log ppl| ≲ 2·rms(Δlogits) ≤
# 2 × SMOLLM2_LOGITS_BOUND × rms(logits), the scale taken from transformers' logits (rms 7.8 on these windows:
# 5.6e-3, the bar of 5e-3 for the same protocol through both stacks; measured 1.4e-7).


def test_detokenizer_undoes_the_tokenized_release():
    tokenized = 'He had a guest @-@ starring role , in 2 @,@ 000 ( 1 @.@ 5 % ) . " Teddy \'s Story " : it'
    assert corpora.detokenize(tokenized) == 'He had a guest-starring role, in 2,000 (1.5%). "Teddy\'s Story": it'


def test_missing_and_empty_data_dirs(tmp_path, capsys):
    with pytest.raises(corpora.DataError, match="does not exist"):
        corpora.load_text("test", tmp_path / "nowhere")
    with pytest.raises(corpora.DataError, match="holds no wiki"):
        corpora.load_text("test", tmp_path)
    (tmp_path / "wiki.test.raw").write_text("   \n")
    with pytest.raises(corpora.DataError, match="is empty"):
        corpora.load_text("test", tmp_path)
    with pytest.raises(corpora.DataError, match="is missing"):
        corpora.load_text("valid", tmp_path)


def test_windows_protocol():
    ids = np.arange(10, dtype=np.int32)
    np.testing.assert_array_equal(corpora.windows(ids, 4), [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert corpora.windows(ids, 4, count=1).shape == (1, 4)
    with pytest.raises(corpora.DataError, match="make no window"):
        corpora.windows(ids, 11)


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers(smollm2_dir, wikitext_dir, smollm2_transformers):
    ids = corpora.tokenize(load_tokenizer(smollm2_dir), corpora.load_text("test", wikitext_dir))
    token_windows = corpora.windows(ids, 256, count=3)
    ours = perplexity(load_model(smollm2_dir), token_windows, batch_size=3, progress=False)

    hf = smollm2_transformers
    with torch.no_grad():
        batch = torch.tensor(token_windows, dtype=torch.long)
        logits = hf(batch).logits[:, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    theirs = math.exp(nll.item())
    bound = 2 * SMOLLM2_LOGITS_BOUND * float(logits.pow(2).mean().sqrt())
    assert ours["tokens"] == 3 * 255
    assert abs(math.log(ours["ppl"]) - nll.item()) <= bound, (ours["ppl"], theirs, bound)


def test_cli_writes_json_with_the_protocol(tiny_hf_dir, tmp_path, prose_dir, capsys):
    from llama_surgery_jax.model.conversion import convert

    model_dir = convert(tiny_hf_dir, tmp_path / "tiny", progress=False)
    # The tiny model has no tokenizer of its own: give it a word-level one so the CLI's whole path runs.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(511)} | {"[UNK]": 511}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)

    out = tmp_path / "ppl.json"
    rc = main(["--model", str(model_dir), "--data-dir", str(prose_dir), "--context", "64",
               "--max-windows", "2", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["tokens"] == 2 * 63 and result["protocol"]["bos"] is False
    assert result["protocol"]["context"] == 64 and math.isfinite(result["ppl"])
    assert "wikitext-2 test perplexity" in capsys.readouterr().out


def test_cli_bad_model_dir(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--data-dir", str(tmp_path)]) == 2
    assert "is not a converted model" in capsys.readouterr().err


def test_dense_logits_are_float32_and_causal(tiny_hf_dir, tmp_path):
    from llama_surgery_jax.model.conversion import convert

    model = load_model(convert(tiny_hf_dir, tmp_path / "m", progress=False))
    ids = np.random.default_rng(0).integers(0, 512, size=(1, 32))
    changed = ids.copy()
    changed[0, 20:] = (changed[0, 20:] + 1) % 512
    a, b = model(jnp.asarray(ids))[0], model(jnp.asarray(changed))[0]
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a[0, :20]), np.asarray(b[0, :20]))


def test_surgery_init_prints_the_dense_perplexity_exactly(tiny_model_dir, prose_dir, tmp_path):
    """Homotopy routers with one query chunk do dense attention's arithmetic op for op (test_surgery's step-0
    tests), through the same scorer: the perplexities are equal bit for bit by construction."""
    args = ["--model", str(tiny_model_dir), "--data-dir", str(prose_dir), "--context", "64", "--max-windows", "2"]
    assert main([*args, "--json", str(tmp_path / "dense.json")]) == 0
    assert main([*args, "--surgery", "init", "--json", str(tmp_path / "init.json")]) == 0
    dense, init = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("dense", "init"))
    assert init["surgery"] == "init" and init["ppl"] == dense["ppl"]


def test_surgery_from_a_training_run(tiny_run, tiny_model_dir, prose_dir, tmp_path, capsys):
    config, run_dir, trained = tiny_run
    assert (config.eval_context, config.eval_windows, config.eval_batch) == (64, 2, 2)  # as the CLI below
    assert main(["--model", str(tiny_model_dir), "--data-dir", str(prose_dir), "--context", "64",
                 "--max-windows", "2", "--batch-size", "2", "--surgery", str(run_dir),
                 "--json", str(tmp_path / "s.json")]) == 0
    # The same routers (restored bit for bit), windows and scorer as the run's own report, but another compiled
    # program (the run's arrays are placed on its mesh): the tiny model's float32 bound on log perplexity.
    ppl = json.loads((tmp_path / "s.json").read_text())["ppl"]
    assert abs(math.log(ppl) - math.log(trained["surgery_ppl"])) <= TINY_NLL_BOUND, (ppl, trained["surgery_ppl"])
    assert main(["--model", str(tiny_model_dir), "--data-dir", str(prose_dir), "--surgery",
                 str(tmp_path / "nowhere")]) == 2
    assert "holds no router checkpoints" in capsys.readouterr().err


def test_quality_script_end_to_end_on_tiny(tiny_run, tiny_model_dir, prose_dir, tmp_path):
    """Every section of `quality` (perplexity table, curve, NIAH, speed, p ablation, plots) on the tiny model,
    from the shared tiny run."""
    from llama_surgery_jax.quality import main as quality_main

    run_dir = tiny_run[1]
    tiny = [f"data_dir={prose_dir}", "seq_len=64", "batch_size=2", "steps=2", "eval_context=64",
            "eval_windows=2", "eval_batch=2"]
    out = tmp_path / "quality"
    assert quality_main([
        "--run", str(run_dir), "--model", str(tiny_model_dir), "--data-dir", str(prose_dir),
        "--out", str(out), "--contexts", "64,128", "--windows", "2", "--curve-context", "64", "--curve-windows", "2",
        "--d-max", "2", "--window-sweep", "4", "--baseline-extra", "0", "--niah-lengths", "96", "--niah-depths", "0,1",
        "--niah-trials", "1", "--speed-contexts", "64", "--speed-new-tokens", "4", "--speed-dtype", "float32",
        "--ablate-p", "3", "--ablate-preset", "smoke", "--ablate-steps", "1",
        *[f"--ablate-override={o}" for o in tiny[1:] if not o.startswith("steps")]]) == 0
    result = json.loads((out / "quality.json").read_text())
    rows = result["perplexity"]
    assert [r["context"] for r in rows] == [64, 128]
    assert all(math.isfinite(r[k]) for r in rows for k in ("dense", "surgery", "streaming", "moba"))
    assert {p["series"] for p in result["curve"]} == {"dense", "surgery", "surgery, d_max sweep", "surgery, W sweep",
                                                       "streaming", "moba"}
    assert [r["cases"] for r in result["niah"]["surgery"]] == [1, 1]
    assert {r["model"] for r in result["speed"]} == {"dense", "surgery, gather decode", "surgery, masked decode"}
    assert result["ablation"][0]["p"] == 3 and result["ablation"][0]["levels"] == 4  # 3^4 >= 64 > 3^3
    for name in ("quality.md", "quality_density.png", "density_heatmap.png", "tree_path.png"):
        assert (out / name).is_file(), name
    # A second, shorter invocation replaces the sections it runs and keeps the others.
    assert quality_main(["--run", str(run_dir), "--model", str(tiny_model_dir), "--data-dir",
                         str(prose_dir), "--out", str(out), "--contexts", "64", "--windows", "1",
                         "--curve-context", "64", "--curve-windows", "0", "--niah-lengths", "", "--speed-contexts",
                         ""]) == 0
    again = json.loads((out / "quality.json").read_text())
    assert [r["windows"] for r in again["perplexity"]] == [1]
    assert all(again[k] == result[k] for k in ("curve", "niah", "speed", "ablation"))


def test_cli_contexts_dense_too_baseline_and_niah(tiny_model_dir, prose_dir, tmp_path, capsys):
    args = ["--model", str(tiny_model_dir), "--data-dir", str(prose_dir), "--max-windows", "2"]
    out = tmp_path / "r.json"
    assert main([*args, "--contexts", "64,128", "--surgery", "init", "--dense-too", "--niah", "96",
                 "--niah-trials", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["context"] for r in result["by_context"]] == [64, 128] and result["context"] == 64
    # Homotopy routers are exactly dense: the same pipeline gives the same perplexity, bit for bit.
    assert all(r["gap"] == 0.0 for r in result["by_context"])
    assert len(result["niah"]) == 5 and result["niah"] == result["niah_dense"]
    assert main([*args, "--context", "128", "--baseline", "streaming", "--baseline-density", "1.0",
                 "--baseline-tile", "32", "--dense-too", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    # At full density the streaming baseline attends to every causal pair, but with its own chunked softmax:
    # float32 reassociation of the tiny model, so the perplexity ratio's gap is within TINY_NLL_BOUND.
    assert result["baseline"]["block_density"] == 1.0 and abs(result["gap"]) <= TINY_NLL_BOUND, result["gap"]
    assert main([*args, "--baseline", "moba", "--surgery", "init"]) == 2
    assert "not with --surgery" in capsys.readouterr().err


def test_a_run_evaluates_on_its_own_base_model_and_refuses_another(tiny_run, tiny_model_dir, smollm2_dir, prose_dir,
                                                                   capsys):
    """No --model: the base the run was trained on (not the embedded default). Another --model: refused by
    its fingerprint with a clear message, not an orbax traceback."""
    from llama_surgery_jax.training.checkpoints import model_fingerprint, trained_base

    _, run_dir, _ = tiny_run
    assert trained_base(run_dir) == tiny_model_dir.absolute()
    common = ["--context", "64", "--max-windows", "1", "--data-dir", str(prose_dir)]
    assert main(["--surgery", str(run_dir), *common]) == 0
    assert main(["--surgery", str(run_dir), "--model", str(smollm2_dir), *common]) == 2
    err = capsys.readouterr().err
    assert "were trained on the base model" in err and str(smollm2_dir) in err
    # The same model converted elsewhere matches: the fingerprint leaves the source's path out.
    here = model_fingerprint(tiny_model_dir)
    assert here["sha256"] != here["legacy_sha256"]
