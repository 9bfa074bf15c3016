"""Loading a trained language model run for sampling: its model from ``config.json``, its latest params, and the
text codec of its data source.

``load_run(workdir)`` needs only the workdir of ``python -m effjax.main``: the model is rebuilt from the resolved
config the trainer wrote (``config.json``), with the vocabulary size read from the saved token embedding (so the
data source, which may read a whole corpus, is never built). Every problem with the workdir is a ``RunError`` with
a one-line message naming it and the fix; ``python -m effjax.sample`` prints it and exits with status 2.
"""

import json
import os

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

import effjax.models
from effjax.train.warm_start import restore_params

TRAIN_COMMAND = "python -m effjax.main --config=configs/lm_bytes.py --workdir={workdir}"
_EMBEDDING = "token_embed/embedding"  # the trunk's token table [vocab, embed] (effjax.models.layers.Trunk)


class RunError(ValueError):
    """A workdir that cannot be sampled from; the message (one line) names the problem and the fix."""


def load_run(workdir: str, step: int | None = None) -> tuple:
    """``(model, params, config)`` of the language model trained in ``workdir``: the model rebuilt from its
    ``config.json`` (``config`` is that file as a dict), and the nested params of its latest checkpoint, or of
    checkpoint ``step``. Raises ``RunError`` for a workdir that does not exist, is not a trainer's, has no
    checkpoint yet, holds another kind of model, or whose checkpoint cannot be read."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = read_config(workdir)
    name = config["model"]["name"]
    try:
        task = effjax.models.task_of(name)
    except ValueError as error:
        raise RunError(f"{workdir}/config.json: {error}") from None
    if task != "lm":
        raise RunError(f"{workdir} is a run of model {name!r}, which trains on {task!r} data, not a language model: "
                       f"sampling needs a decoder LM run (model.name 'decoder_lm', e.g. "
                       f"{TRAIN_COMMAND.format(workdir='DIR')}).")
    directory = checkpoint_path(workdir, config, step)
    try:
        flat = restore_params(directory)
    except Exception as error:  # orbax and tensorstore raise many types for missing or damaged files
        raise RunError(_damaged(directory, error)) from None
    model = build_model(config, flat, workdir)
    return model, unflatten_dict(flat, sep="/"), config


def read_config(workdir: str) -> dict:
    """The resolved config a trainer wrote to ``workdir/config.json``, as a dict."""
    if not os.path.exists(workdir):
        raise RunError(f"--workdir {workdir} does not exist: point it at the workdir of a training run "
                       f"({TRAIN_COMMAND.format(workdir='DIR')}).")
    if not os.path.isdir(workdir):
        raise RunError(f"--workdir {workdir} is a file, not a directory: point it at the workdir of a training run.")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise RunError(f"{workdir} has no config.json, so it is not a trainer's workdir: point --workdir at the "
                       f"directory a run was given ({TRAIN_COMMAND.format(workdir='DIR')}).")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise RunError(f"{path} cannot be read ({type(error).__name__}: {_first_line(error)}); the trainer "
                       "rewrites it when the run resumes.") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "name" not in config["model"]:
        raise RunError(f"{path} has no model.name, so it is not a trainer's config.json: point --workdir at the "
                       f"directory a run was given ({TRAIN_COMMAND.format(workdir='DIR')}).")
    return config


def checkpoint_path(workdir: str, config: dict, step: int | None = None) -> str:
    """``workdir/checkpoints/<step>``: the latest checkpoint, or ``step``'s."""
    directory = os.path.join(workdir, "checkpoints")
    steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []
    if not steps:
        every = config.get("checkpoint_every")
        when = f"every {every} steps and at the end" if every else "at the end"
        raise RunError(f"{workdir} has no checkpoint yet (no {directory}/<step>): train first, or wait for the "
                       f"run's first save ({when}): {TRAIN_COMMAND.format(workdir=workdir)}.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise RunError(f"{workdir} has no checkpoint of step {step}; it has steps {', '.join(map(str, steps))}.")
    return os.path.join(directory, str(step))


def build_model(config: dict, flat_params: dict, workdir: str = ""):
    """The model of ``config['model']`` with the vocabulary of the saved token embedding; RunError when the
    config and the checkpoint's params do not describe the same model."""
    embeddings = [key for key in flat_params if key.endswith(_EMBEDDING)]
    if len(embeddings) != 1:
        raise RunError(f"the checkpoint of {workdir} has {len(embeddings)} token embeddings ('*/{_EMBEDDING}') "
                       "instead of one: it is not a decoder LM's.")
    vocab_size = int(flat_params[embeddings[0]].shape[0])
    fields = {key: _tuples(value) for key, value in config["model"].items() if key != "name"}
    try:
        model = effjax.models.build(config["model"]["name"], vocab_size=vocab_size, num_classes=None, **fields)
        tokens = jnp.zeros((1, model.max_length), jnp.int32)
        shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), tokens)))["params"]
    except (ValueError, TypeError) as error:
        raise RunError(f"{workdir}/config.json does not build its model ({_first_line(error)}); it may come from "
                       "another version of effjax.") from None
    expected = {key: tuple(value.shape) for key, value in flatten_dict(shapes, sep="/").items()}
    saved = {key: tuple(value.shape) for key, value in flat_params.items()}
    if expected != saved:
        differ = sorted(key for key in set(expected) | set(saved) if expected.get(key) != saved.get(key))
        key = differ[0]
        raise RunError(f"{workdir}/config.json and its checkpoint describe different models ({len(differ)} params "
                       f"differ, e.g. {key}: {list(expected.get(key, ()))or 'absent'} from config.json, "
                       f"{list(saved.get(key, ())) or 'absent'} saved); was config.json replaced after the save?")
    return model


class ByteCodec:
    """``bytes_lm``'s tokens: each UTF-8 byte plus one (0 is padding; ``effjax.data.common.byte_ids``)."""

    def encode(self, text: str) -> list[int]:
        return [byte + 1 for byte in text.encode("utf-8")]

    def decode(self, tokens) -> str:
        """Text of ``tokens``; padding is dropped and invalid UTF-8 becomes U+FFFD."""
        return bytes(int(t) - 1 for t in tokens if 1 <= int(t) <= 256).decode("utf-8", errors="replace")


_CODECS = {"bytes_lm": ByteCodec}


def text_codec(config: dict):
    """The text codec (``encode(text) -> tokens``, ``decode(tokens) -> text``) of the run's data source."""
    source = config.get("data", {}).get("name")
    if source not in _CODECS:
        raise RunError(f"data source {source!r} of this run has no text codec: sampling text needs one of "
                       f"{', '.join(sorted(_CODECS))} (add a codec in effjax/inference/checkpoint.py).")
    return _CODECS[source]()


def _tuples(value):
    """JSON lists back to the tuples the config held (``attention``, ``full_attention_layers``, ...)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _first_line(error: Exception, limit: int = 200) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _damaged(directory: str, error: Exception) -> str:
    steps = sorted(int(n) for n in os.listdir(os.path.dirname(directory)) if n.isdigit())
    earlier = [s for s in steps if s < int(os.path.basename(directory))]
    fix = f"sample the one before it with --step={earlier[-1]}" if earlier else "train the run again to save a new one"
    return (f"checkpoint {directory} is damaged or unreadable ({type(error).__name__}: {_first_line(error)}); "
            f"{fix}.")
