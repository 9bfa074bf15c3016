"""``python -m effjax.sample``: loading a trained byte LM run (``effjax.inference.checkpoint``) and sampling from it."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from absl import logging as absl_logging
from helpers import ROOT, subprocess_env

from effjax import sample as sample_cmd
from effjax.inference import checkpoint, generate
from effjax.train import trainer

CORPUS = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x = 1\n    y = 2\n\n" * 60


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A byte LM (decoder_lm, ``configs/lm_bytes.py:smoke``: 1 layer, 32 wide, 32 positions) trained 40 steps on a
    small repetitive text, so its greedy continuations are text; checkpoints at steps 20 and 40."""
    from configs import lm_bytes

    root = tmp_path_factory.mktemp("sample")
    (root / "corpus").mkdir()
    (root / "corpus" / "code.py").write_text(CORPUS)
    config = lm_bytes.get_config("smoke")
    config.data.paths = str(root / "corpus")
    config.total_steps, config.learning_rate, config.log_every = 40, 1e-2, 20
    config.checkpoint_every, config.eval_every, config.eval_max_batches = 20, 0, 1
    workdir = str(root / "run")
    trainer.train_and_evaluate(config, workdir)
    return workdir


def run_sample(*args):
    """``python -m effjax.sample ARGS`` in this process: (exit status, stdout, stderr) via ``capfd``-free capture."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    hook, verbosity = sys.unraisablehook, absl_logging.get_verbosity()
    flags.FLAGS.unparse_flags()
    sample_cmd.SAMPLE_FLAGS.unparse_flags()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                sample_cmd.main(sample_cmd.parse(["effjax.sample", *args]))
            except SystemExit as exit_:
                code = exit_.code
    finally:
        flags.FLAGS.unparse_flags()
        sample_cmd.SAMPLE_FLAGS.unparse_flags()
        sys.unraisablehook = hook
        absl_logging.set_verbosity(verbosity)
    return code, out.getvalue(), err.getvalue()


def samples_of(stdout):
    """The texts between the ``--- sample i ---`` lines, and the final speed line."""
    lines = stdout.rstrip("\n").split("\n")
    texts, current = [], None
    for line in lines[:-1]:
        if line.startswith("--- sample "):
            current = []
            texts.append(current)
        else:
            current.append(line)
    return ["\n".join(t) for t in texts], lines[-1]


def test_sample_prints_distinct_continuations_and_speed(run_dir):
    code, out, err = run_sample(f"--workdir={run_dir}", "--prompt=def ", "--num_samples=3", "--max_new_tokens=12",
                                "--temperature=1.0")
    assert code == 0, err
    texts, speed = samples_of(out)
    assert len(texts) == 3 and all(t.startswith("def ") and len(t) > len("def ") for t in texts)
    assert len(set(texts)) > 1  # distinct draws of one prompt
    assert "36 new tokens in" in speed and "tokens/s" in speed and "step 40 of" in speed, speed


def test_greedy_is_deterministic_and_learned_the_text(run_dir):
    first = run_sample(f"--workdir={run_dir}", "--prompt=def ", "--max_new_tokens=12", "--temperature=0")
    second = run_sample(f"--workdir={run_dir}", "--prompt=def ", "--max_new_tokens=12", "--temperature=0",
                        "--seed=7", "--prefill_chunk=3")  # another seed and a chunked prefill: the same greedy text
    assert first[0] == second[0] == 0, (first, second)
    assert samples_of(first[1])[0] == samples_of(second[1])[0]
    text = samples_of(first[1])[0][0]
    assert text.isascii() and text.startswith("def "), text


def test_greedy_equals_generate_and_repeated_forward_passes(run_dir):
    model, params, config = checkpoint.load_run(run_dir)
    assert model.vocab_size == 257 and config["model"]["name"] == "decoder_lm"
    codec = checkpoint.text_codec(config)
    prompt = codec.encode("class P")
    new = 6
    generated = generate(model, params, [prompt], max_new_tokens=new, temperature=0.0)
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    tokens = list(prompt)
    for _ in range(new):  # full forward passes (right-padded to one shape), argmax at the last token
        logits = forward(jnp.asarray([tokens + [0] * (model.max_length - len(tokens))], jnp.int32))
        tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
    assert generated.tokens[0].tolist() == tokens[len(prompt):]
    result = sample_cmd.sample(run_dir, "class P", max_new_tokens=new, temperature=0)
    assert result.texts == [codec.decode(tokens)] and result.new_tokens == new


def test_a_conversation_continues_the_kept_context_as_the_readme_shows(run_dir):
    model, params, config = checkpoint.load_run(run_dir)
    codec = checkpoint.text_codec(config)
    newline = codec.encode("\n")
    first = generate(model, params, [codec.encode("def ")], max_new_tokens=8, keep_context=True, stop_tokens=newline)
    second = generate(model, params, [codec.encode("cl")], max_new_tokens=6, context=first.context,
                      stop_tokens=newline)
    whole = codec.encode("def ") + list(first.tokens[0, :first.lengths[0]]) + codec.encode("cl")
    want = generate(model, params, [whole], max_new_tokens=6, stop_tokens=newline)
    assert second.tokens.tolist() == want.tokens.tolist() and second.lengths.tolist() == want.lengths.tolist()


def test_interactive_lines_continue_the_conversation(run_dir, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("cl\n\n"))  # a line, then an empty one: continue as it is
    code, out, err = run_sample(f"--workdir={run_dir}", "--prompt=def ", "--max_new_tokens=5", "--temperature=0",
                                "--stop=\\n", "--interactive")
    assert code == 0, err
    # Each turn from the whole conversation so far, by generate (greedy): the turns' texts must be these.
    model, params, config = checkpoint.load_run(run_dir)
    codec = checkpoint.text_codec(config)
    conversation, want = "", ""
    for line in ("def ", "cl", ""):
        conversation += line
        out_ = generate(model, params, [codec.encode(conversation)], max_new_tokens=5, stop_tokens=codec.encode("\n"))
        text = line + codec.decode(out_.tokens[0, :out_.lengths[0]])
        conversation += text[len(line):]
        want += f"--- sample 1 ---\n{text}" + ("" if text.endswith("\n") else "\n")
    assert out.count("--- sample 1 ---") == 3, out
    assert "".join(line for line in out.splitlines(keepends=True) if line.startswith("--- sample") or
                   not line.startswith("--- ")) == want
    monkeypatch.setattr(sys, "stdin", io.StringIO("class Point:\n" * 5))  # more than the 32-token cache holds
    code, out, err = run_sample(f"--workdir={run_dir}", "--prompt=def ", "--max_new_tokens=5", "--interactive")
    last = out.splitlines()[-1]
    assert code == 0 and last.startswith("--- the conversation ends: ") and "start a new conversation" in last, out
    code, _, err = run_sample(f"--workdir={run_dir}", "--prompt=def ", "--stop=ab", "--interactive")
    assert code == 2 and "A conversation needs --stop of one token, and 'ab' is 2" in err


def test_stop_ends_each_sample_after_the_stop_text(run_dir):
    greedy = sample_cmd.sample(run_dir, "def ", max_new_tokens=20, temperature=0).texts[0]
    stop = next(c for c in greedy[5:] if c.isprintable())  # a character the continuation reaches after a few
    code, out, err = run_sample(f"--workdir={run_dir}", "--prompt=def ", "--max_new_tokens=20", "--temperature=0",
                                f"--stop={stop}")
    assert code == 0, err
    assert samples_of(out)[0] == [greedy[:greedy.index(stop, 4) + 1]]
    two = greedy[4:6]  # a two-character stop text: generation runs on, the text is cut after it
    assert sample_cmd.sample(run_dir, "def ", max_new_tokens=20, temperature=0, stop=two).texts == [greedy[:6]]
    assert sample_cmd.unescape(r"a\nb\tc\\n\x") == "a\nb\tc\\n\\x"


def test_an_earlier_step_loads(run_dir):
    code, out, err = run_sample(f"--workdir={run_dir}", "--prompt=def ", "--max_new_tokens=4", "--step=20")
    assert code == 0 and "step 20 of" in out.splitlines()[-1], (out, err)
    code, _, err = run_sample(f"--workdir={run_dir}", "--prompt=def ", "--step=30")
    assert code == 2 and "has no checkpoint of step 30; it has steps 20, 40." in err


def test_byte_codec():
    codec = checkpoint.ByteCodec()
    assert codec.encode("aé") == [98, 196, 170]
    assert codec.decode([0, *codec.encode("aé\n"), 0]) == "aé\n"
    assert codec.decode([196]) == "\ufffd"  # a lone lead byte
    with pytest.raises(checkpoint.RunError, match="data source 'listops' of this run has no text codec"):
        checkpoint.text_codec({"data": {"name": "listops"}})


def _workdir_with_config(tmp_path, run_dir, **model):
    """A copy of ``run_dir``'s config.json (model fields overridden) in an empty workdir."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    config["model"].update(model)
    workdir = tmp_path / "other"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(config))
    return workdir


def _damaged(tmp_path, run_dir, *, data=False):
    """A copy of ``run_dir`` whose latest checkpoint lost its metadata files, or with ``data`` had its array data
    overwritten (whose failed reads leave tensorstore callbacks that print after the error: the command hides
    them, a test process would report them, so that case runs as a command in the slow test)."""
    workdir = tmp_path / "damaged"
    shutil.copytree(run_dir, workdir)
    state = workdir / "checkpoints" / "40" / "state"
    if data:
        for name in os.listdir(state / "d"):
            (state / "d" / name).write_bytes(b"not a checkpoint")
    else:
        (state / "_METADATA").unlink()
        (state / "manifest.ocdbt").unlink()
    return workdir


def _not_lm(tmp_path, run_dir):
    return _workdir_with_config(tmp_path, run_dir, name="encoder_classifier")


def _no_checkpoint(tmp_path, run_dir):
    return _workdir_with_config(tmp_path, run_dir)


def _other_model(tmp_path, run_dir):
    workdir = _workdir_with_config(tmp_path, run_dir, embed_dim=64)
    shutil.copytree(os.path.join(run_dir, "checkpoints"), workdir / "checkpoints")
    return workdir


BAD = {  # case: (workdir, extra flags, the message's fragments)
    "missing workdir": (lambda tmp, run: tmp / "nowhere", [], ["nowhere does not exist",
                                                               "--workdir=DIR"]),
    "not a workdir": (lambda tmp, run: tmp, [], ["has no config.json, so it is not a trainer's workdir"]),
    "no checkpoint": (_no_checkpoint, [], ["has no checkpoint yet", "train first, or wait for the run's first save "
                                           "(every 20 steps and at the end)", "python -m effjax.main "
                                           "--config=configs/lm_bytes.py --workdir="]),
    "not an lm": (_not_lm, [], ["is a run of model 'encoder_classifier', which trains on 'classification' data, "
                                "not a language model"]),
    "damaged": (_damaged, [], ["checkpoints/40 is damaged or unreadable", "--step=20"]),
    "config and checkpoint differ": (_other_model, [], ["describe different models"]),
    "past max_length": (lambda tmp, run: run, ["--max_new_tokens=40"],
                        ["past the model's maximum length 32", "use max_new_tokens <= 29"]),
    "prompt too long": (lambda tmp, run: run, ["--prompt=" + "x" * 40], ["longer than the model's maximum length"]),
    "top_p": (lambda tmp, run: run, ["--top_p=0"], ["top_p must be in (0, 1]"]),
    "top_p above 1": (lambda tmp, run: run, ["--top_p=1.5"], ["top_p must be in (0, 1]"]),
    "empty prompt": (lambda tmp, run: run, ["--prompt="], ["prompt 0 is empty"]),
    "num_samples": (lambda tmp, run: run, ["--num_samples=0"], ["--num_samples must be an int >= 1"]),
    "prefill_chunk": (lambda tmp, run: run, ["--prefill_chunk=1"], ["prefill_chunk must be 0 (the whole prompt at "
                                                                   "once) or an int >= 2"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_status_2(tmp_path, run_dir, case):
    make, extra, fragments = BAD[case]
    workdir = make(tmp_path, run_dir)
    code, out, err = run_sample(f"--workdir={workdir}", "--prompt=def ", "--max_new_tokens=4", *extra)
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("effjax.sample: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.slow
def test_command_in_a_process_with_other_devices_than_the_trainer(tmp_path, run_dir):
    # The run was trained on the tests' 8 emulated devices; the command loads it on 1 and prints a greedy sample.
    # A checkpoint with damaged array data gives one line, without tensorstore's late callbacks.
    command = [sys.executable, "-m", "effjax.sample", f"--workdir={run_dir}", "--prompt=def ", "--max_new_tokens=8",
               "--temperature=0"]
    proc = subprocess.run(command, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    expected = sample_cmd.sample(run_dir, "def ", max_new_tokens=8, temperature=0).texts
    assert samples_of(proc.stdout)[0] == expected
    for workdir, message in [("/nonexistent/run", "does not exist"),
                             (_damaged(tmp_path, run_dir, data=True), "checkpoints/40 is damaged or unreadable")]:
        bad = subprocess.run([*command[:3], f"--workdir={workdir}", "--prompt=x"], cwd=ROOT,
                             env=subprocess_env(1), capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1, bad.stderr
        assert bad.stderr.startswith("effjax.sample: ") and message in bad.stderr, bad.stderr
