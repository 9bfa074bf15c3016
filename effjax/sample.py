"""Command-line sampling: continues a prompt with the latest checkpoint of a trained language model run.

  python -m effjax.sample --workdir=/tmp/lm_bytes --prompt="def " --temperature=0
  python -m effjax.sample --workdir=/tmp/lm_bytes --prompt="import " --num_samples=3 --top_p=0.9 --stop='\\n'
  python -m effjax.sample --workdir=/tmp/lm_bytes --prompt="def " --stop='\\n' --interactive   # then type lines

The model comes from the run's ``config.json`` and its params from ``checkpoints/<latest step>``
(``effjax.inference.checkpoint``); ``effjax.generate`` decodes with a cache. Each sample is printed as the prompt
and its continuation after a ``--- sample i ---`` line, then one line with the new tokens per second. With
``--interactive`` each line read from standard input then continues every sample's conversation where it stopped
(``effjax.generate``'s kept context: only the new line is prefilled), until the end of the input or of the cache.
A bad workdir or setting is one line on stderr and exit status 2 (``-v 1`` shows the traceback).
"""

import dataclasses
import logging as std_logging
import os
import re
import sys
import time

from absl import app, flags, logging

# The command's own flags live in their own registry, so importing this module (a test, a notebook) defines nothing in
# absl's global FLAGS, where another tool's --workdir would collide with this one.
SAMPLE_FLAGS = flags.FlagValues()
_OWN = {"flag_values": SAMPLE_FLAGS}
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a language model training run (python -m effjax.main).",
                               **_OWN)
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue (taken literally; at least one character).", **_OWN)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Continuations of the prompt, drawn in one batch.", **_OWN)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample (at most).", **_OWN)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy (deterministic).", **_OWN)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens only; 0: all.", **_OWN)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set of tokens with this much "
                            "probability, in (0, 1]; 1: all.", **_OWN)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the draws (a seed and settings give the same samples).", **_OWN)
_STOP = flags.DEFINE_string("stop", "", "End a sample after this text (\\n, \\t and \\\\ are escapes, so "
                            "--stop='\\n' ends at the first newline); '': run to --max_new_tokens.", **_OWN)
_STEP = flags.DEFINE_integer("step", 0, "Checkpoint step to load; 0: the latest.", **_OWN)
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 0, "Prefill the prompt this many tokens at a time (>= 2; "
                                      "bounds a long prompt's prefill memory); 0: all at once.", **_OWN)
_INTERACTIVE = flags.DEFINE_bool("interactive", False, "After the first continuation, read more prompts from standard "
                                  "input, one per line (escapes as in --stop), each continuing the conversation.",
                                  **_OWN)
flags.mark_flags_as_required(["workdir", "prompt"], flag_values=SAMPLE_FLAGS)

_COMPILE_EVENTS = frozenset(["/jax/core/compile/jaxpr_trace_duration",
                             "/jax/core/compile/jaxpr_to_mlir_module_duration",
                             "/jax/core/compile/backend_compile_duration"])
_compile_seconds = [0.0]  # summed by _count_compile, a jax.monitoring listener registered once


@dataclasses.dataclass(frozen=True)
class Samples:
    """The texts (prompt and continuation) and how fast they came: ``new_tokens`` in ``seconds``, of which
    ``compile_seconds`` went to tracing and compiling."""

    texts: list
    new_tokens: int
    seconds: float
    compile_seconds: float
    description: str
    context: object = None  # effjax.generate's kept context, to continue (keep_context=True)

    def speed_line(self) -> str:
        line = f"{self.new_tokens} new tokens in {self.seconds:.2f} s: {self.new_tokens / self.seconds:.1f} tokens/s"
        decoding = self.seconds - self.compile_seconds
        if self.compile_seconds > 0.01 and decoding > 0:
            line += (f" ({self.compile_seconds:.2f} s of it compiling; "
                     f"{self.new_tokens / decoding:.1f} tokens/s without)")
        return f"{line}; {self.description}"


def unescape(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` in ``text`` as the characters they name; other backslashes stay."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def sample(workdir: str, prompt: str, *, num_samples: int = 1, max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: str = "", step: int | None = None,
           run=None, prefill_chunk: int = 0, keep_context: bool = False, context=None) -> Samples:
    """``num_samples`` continuations of ``prompt`` by the run in ``workdir`` (``run``: its ``load_run``, if
    already loaded; ``workdir`` None then describes it as given params). ``stop`` ends a sample after its first
    occurrence in the continuation; ``prefill_chunk``, ``keep_context`` and ``context`` (a conversation's next
    turn: ``prompt`` follows each sample's text so far) are ``effjax.generate``'s."""
    import jax

    from effjax.inference import generate
    from effjax.inference.checkpoint import load_run, text_codec

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"--num_samples must be an int >= 1, got {num_samples!r}.")
    model, params, config = run or load_run(workdir, step)
    codec = text_codec(config)
    tokens = codec.encode(prompt)
    stop_tokens = codec.encode(stop) if stop else []
    if (keep_context or context is not None) and len(stop_tokens) > 1:
        raise ValueError(f"A conversation needs --stop of one token, and {stop!r} is {len(stop_tokens)}: the "
                         "generation would run on past it into the kept context; use one character or none.")
    _watch_compiles()
    compiled = _compile_seconds[0]
    start = time.perf_counter()
    out = generate(model, params, [tokens] * num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, stop_tokens=stop_tokens if len(stop_tokens) == 1 else (), seed=seed,
                   prefill_chunk=prefill_chunk, keep_context=keep_context, context=context)
    seconds = time.perf_counter() - start
    texts = []
    for row, length in zip(out.tokens, out.lengths, strict=True):
        text = codec.decode(tokens + [int(t) for t in row[:length]])
        if stop:
            end = text.find(stop, len(prompt))
            text = text if end < 0 else text[:end + len(stop)]
        texts.append(text)
    size = sum(x.size for x in jax.tree.leaves(params))
    where = f"step {_step_of(config, workdir, step)} of {os.path.abspath(workdir)}" if workdir else "given params"
    description = (f"{config['model']['name']} of {size / 1e6:.2f}M params, {where}, "
                   f"on {jax.devices()[0].platform}")
    return Samples(texts, int(out.lengths.sum()), seconds, _compile_seconds[0] - compiled, description, out.context)


def _step_of(config, workdir, step):
    from effjax.inference.checkpoint import checkpoint_path

    return os.path.basename(checkpoint_path(os.path.abspath(workdir), config, step))


def _watch_compiles():
    if not _compile_seconds[1:]:
        import jax

        jax.monitoring.register_event_duration_secs_listener(_count_compile)
        _compile_seconds.append(True)


def _count_compile(event, duration, **kwargs):
    del kwargs
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


def _drop_abandoned_read_callbacks(unraisable):
    """Hides 'Event loop is closed' from tensorstore's callbacks of the reads of a checkpoint that failed to restore
    (the one-line error says which); any other unraisable exception is printed as usual (as in effjax.main)."""
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def main(argv):
    if len(argv) > 1:
        sys.stderr.write(f"effjax.sample: unexpected argument(s) {' '.join(argv[1:])!r}; quote the prompt: "
                         "--prompt=\"...\".\n")
        sys.exit(2)
    verbose = flags.FLAGS["verbosity"].present
    if not verbose:  # orbax logs every restore at INFO
        logging.set_verbosity(logging.WARNING)
        std_logging.getLogger("absl").setLevel(std_logging.WARNING)
        sys.unraisablehook = _drop_abandoned_read_callbacks
    settings = dict(num_samples=_NUM_SAMPLES.value, max_new_tokens=_MAX_NEW_TOKENS.value,
                    temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
                    stop=unescape(_STOP.value), prefill_chunk=_PREFILL_CHUNK.value,
                    keep_context=_INTERACTIVE.value)
    try:
        from effjax.inference.checkpoint import load_run

        run = load_run(_WORKDIR.value, _STEP.value or None)
        result = sample(_WORKDIR.value, _PROMPT.value, step=_STEP.value or None, run=run, **settings)
    except (ValueError, OSError) as error:
        _fail(error, verbose)
    _print(result)
    if not _INTERACTIVE.value:
        return
    for turn, line in enumerate(sys.stdin):
        try:  # each turn is drawn with its own seed, so that a repeated line is not answered the same way
            result = sample(_WORKDIR.value, unescape(line.rstrip("\n")), step=_STEP.value or None, run=run,
                            context=result.context, **{**settings, "seed": settings["seed"] + turn + 1})
        except ValueError as error:  # the conversation has filled the cache: its end, not a failure
            print(f"--- the conversation ends: {' '.join(str(error).split())}", flush=True)
            return
        _print(result)


def _print(result: Samples) -> None:
    for i, text in enumerate(result.texts):
        print(f"--- sample {i + 1} ---")
        print(text, end="" if text.endswith("\n") else "\n")
    print(f"--- {result.speed_line()}", flush=True)


def _fail(error: Exception, verbose: bool):
    if verbose:
        raise error
    sys.stderr.write(f"effjax.sample: {' '.join(str(error).split())}\n")
    sys.exit(2)


def parse(argv):
    """This command's flags, then absl's own (``-v``) from what is left; a bad or unknown flag is one line, exit 2."""
    if any(arg in ("-h", "--help", "-help", "--helpshort", "--helpfull") for arg in argv[1:]):
        print(__doc__.strip() + "\n\nFlags:\n" + SAMPLE_FLAGS.get_help())
        sys.exit(0)
    try:
        return flags.FLAGS(SAMPLE_FLAGS(argv, known_only=True))
    except flags.Error as error:
        sys.stderr.write(f"effjax.sample: {' '.join(str(error).split())} (--help lists the flags)\n")
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse)
