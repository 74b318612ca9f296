"""Loading causal LMs: built-in tiny configs (offline), local Hugging Face folders, or hub names.

The built-in models are random-initialized (seeded) GPT-2 and Llama configurations small enough for a
laptop, paired with a byte-level tokenizer that needs no download. Everything else goes through
`AutoModelForCausalLM.from_pretrained`, so any HF causal LM with GPT-2-style (c_attn/c_proj) or
Llama-style (q_proj/k_proj/v_proj/o_proj) attention works.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch

from .errors import UserInputError

TINY_CONFIGS = {
    # Two layers, hidden 64: a forward+backward step takes milliseconds on one CPU core.
    # initializer_range 0.1 instead of HF's 0.02: with 0.02 the (tied, frozen) LM head's logits span only
    # about +-1.5 after the final norm, so no attention adapter can make the random base predict a peaked
    # distribution and eval loss stalls near uniform (measured: 5.58 -> 5.07 in 10 rounds vs 6.12 -> 3.72
    # in 5 rounds with 0.1).
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512, initializer_range=0.1,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "tiny-llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=172, max_position_embeddings=512,
                       tie_word_embeddings=True, initializer_range=0.1),
}


def byte_level_tokenizer():
    """A 259-token byte-level tokenizer (3 specials + 256 bytes) built offline; saves as tokenizer.json.

    Written here (with the `tokenizers` library) because the built-in models must run without any hub
    access; every byte string round-trips, so no text is ever out of vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[ch] = i + 3
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=512)


def tiny_config(name: str, vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import AutoConfig

    spec = dict(TINY_CONFIGS[name])
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos,
                                pad_token_id=pad, **spec)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(name_or_path: str):
    if name_or_path in TINY_CONFIGS:
        return byte_level_tokenizer()
    from transformers import AutoTokenizer

    check_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise UserInputError(_model_path_message(name_or_path, e)) from None
    if tok.pad_token_id is None:
        # Causal LMs (GPT-2, LLaMA) ship without a pad token; padding positions carry no loss anyway.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id ('org/name'): absolute, ./ ../ ~, several '/' parts, existing, or whose first
    part is a folder here (`models/llama-7b` beside a models/ folder is a path, never a hub lookup)."""
    if Path(name_or_path).expanduser().exists():
        return True
    if name_or_path.startswith((".", "~", "/")) or (os.sep != "/" and os.sep in name_or_path):
        return True
    if "/" in name_or_path and Path(name_or_path.split("/")[0]).is_dir():
        return True
    return name_or_path.count("/") > 1


def check_model_path(name_or_path: str) -> None:
    """Refuse a local model path that cannot hold a model before any library sees it.

    Hugging Face reads a missing folder as a malformed hub id and an empty folder as a tokenizer problem;
    both messages hide the real mistake, so the common cases are named here first.
    """
    if name_or_path in TINY_CONFIGS:
        return
    fix = ("point model.name_or_path at a Hugging Face model folder (config.json, weights, tokenizer "
           f"files), e.g. one written by save_pretrained, or use a built-in model: {sorted(TINY_CONFIGS)}")
    if not name_or_path.strip():
        raise UserInputError(f"model.name_or_path: is empty; {fix}")
    if not _looks_local(name_or_path):
        close = difflib.get_close_matches(name_or_path, list(TINY_CONFIGS), n=1, cutoff=0.8)
        if close and "/" not in name_or_path:  # a typo of a built-in: fail now, not after hub retries
            raise UserInputError(f"model.name_or_path: {name_or_path!r} is neither a model folder nor a "
                                 f"built-in model; did you mean {close[0]!r}? Set "
                                 f"model.name_or_path={close[0]}")
        return  # a hub id: from_pretrained decides, _model_path_message explains failures
    p = Path(name_or_path).expanduser()
    if not p.exists():
        close = difflib.get_close_matches(name_or_path, list(TINY_CONFIGS), n=1, cutoff=0.7)
        extra = f" (did you mean the built-in {close[0]!r}?)" if close else ""
        raise UserInputError(f"model.name_or_path: folder {name_or_path!r} does not exist{extra}; {fix}")
    if not p.is_dir():
        raise UserInputError(f"model.name_or_path: {name_or_path!r} is a file, not a model folder; {fix}")
    if not (p / "config.json").is_file():
        contents = sorted(x.name for x in p.iterdir())
        what = "is empty" if not contents else f"has no config.json (it holds {contents[:8]})"
        raise UserInputError(f"model.name_or_path: folder {name_or_path!r} {what}, so it is not a model "
                             f"folder; {fix}")


def _model_path_message(name_or_path: str, err: Exception) -> str:
    close = difflib.get_close_matches(name_or_path, list(TINY_CONFIGS), n=1, cutoff=0.7)
    if close:
        return (f"model.name_or_path: {name_or_path!r} is neither a model folder nor a built-in model; "
                f"did you mean {close[0]!r}?")
    detail = f"{err.__class__.__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    if _looks_local(name_or_path):
        return (f"model.name_or_path: {name_or_path!r} is not a loadable Hugging Face model folder "
                f"({detail}). Point it at a folder with config.json, weights and tokenizer files, or use a "
                f"built-in model: {sorted(TINY_CONFIGS)}")
    return (f"model.name_or_path: could not load {name_or_path!r} from the Hugging Face hub ({detail}), and "
            "no local folder of that name exists. Check the spelling; without network access, download it "
            "elsewhere and point model.name_or_path at its local folder, or use a built-in model: "
            f"{sorted(TINY_CONFIGS)}")


def check_max_length(max_length: int, config, name: str) -> None:
    """model.max_length must fit the model's position limit (`config`: a transformers config, or a dict such as
    TINY_CONFIGS' entries); a UserInputError names the limit."""
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    limit = get("max_position_embeddings") or get("n_positions")
    if limit and max_length > limit:
        raise UserInputError(f"model.max_length: {max_length} is longer than {name}'s position limit ({limit}); "
                             f"set model.max_length={limit} or less")


def load_model(name_or_path: str, *, seed: int = 0, dtype: str = "float32", tokenizer=None):
    """Return a causal LM on CPU in `dtype`. Built-in tiny models are initialized from `seed`."""
    from transformers import AutoModelForCausalLM

    if name_or_path in TINY_CONFIGS:
        tok = tokenizer or byte_level_tokenizer()
        config = tiny_config(name_or_path, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        # Seed locally so every rank builds the identical base without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        model = model.to(_dtype(dtype))
    else:
        check_model_path(name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_dtype(dtype))
        except (OSError, ValueError) as e:
            raise UserInputError(_model_path_message(name_or_path, e)) from None
    model.requires_grad_(False)
    return model


# Published architecture configs of the paper's models, so that planning (shapes only, no weights) works
# without hub access. Values from the models' config.json on the Hugging Face hub.
KNOWN_SHAPES = {
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                                     vocab_size=32000, max_position_embeddings=4096),
    "gpt2-medium": dict(model_type="gpt2", n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024),
    "gpt2-large": dict(model_type="gpt2", n_embd=1280, n_layer=36, n_head=20, vocab_size=50257, n_positions=1024),
}


def meta_model(name_or_path: str, *, log=None):
    """The model's structure on the meta device: shapes without weights (planning, byte counts).

    A hub name whose config cannot be fetched (no network) falls back to KNOWN_SHAPES when listed there;
    `log` is told when that happens.
    """
    from transformers import AutoConfig

    if name_or_path in TINY_CONFIGS:
        tok = byte_level_tokenizer()
        config = tiny_config(name_or_path, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    else:
        check_model_path(name_or_path)
        try:  # a local folder or the local hub cache: no network round-trips
            config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        except (OSError, ValueError):
            if name_or_path in KNOWN_SHAPES:  # the shape is all planning needs: skip the hub's retries
                spec = dict(KNOWN_SHAPES[name_or_path])
                config = AutoConfig.for_model(spec.pop("model_type"), **spec)
                if log:
                    log(f"note: {name_or_path} is not cached here; using its published shape (no weights needed)")
            else:
                try:
                    config = AutoConfig.from_pretrained(name_or_path)
                except (OSError, ValueError) as e:
                    raise UserInputError(_model_path_message(name_or_path, e)) from None
    return model_from_config(config)


def model_from_config(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
