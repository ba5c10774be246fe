"""Tokenizers: the character-level tokenizer of the generated tasks, and loading the run's HF tokenizer.

The character tokenizer needs no download: a Hugging Face fast tokenizer (a ``tokenizers`` WordLevel model over
single characters), so everything that speaks HF (the trainer, ``save_pretrained``, an SGLang server given the
model directory) uses it unchanged. Its ids are fixed (model checkpoints depend on them): the table is in
``CHAR_VOCAB``'s docstring. Encoding with special tokens (the default) prepends <bos>: "12+34=" -> [2, 5, 6, 14,
7, 8, 17]; any other character encodes to <unk>; the special tokens written literally ("<eos>") encode to their
ids. Decoding concatenates characters; ``skip_special_tokens=True`` drops <pad>/<eos>/<bos>/<unk>.

Example:
    tok = build_char_tokenizer("run/hf")          # also writes tokenizer.json + tokenizer_config.json
    tok = load_tokenizer("run/hf")                # same ids; or AutoTokenizer.from_pretrained("run/hf")
    ids = tok("12+34=")["input_ids"] + [tok.eos_token_id]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BOS, UNK)
"""Special tokens in id order: <pad>=0, <eos>=1, <bos>=2, <unk>=3."""
CHARS: str = "0123456789+-*= \n"
"""The ordinary characters in id order, from id 4."""
CHAR_VOCAB: dict[str, int] = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARS))}
"""token -> id of the character tokenizer (20 entries), fixed (model checkpoints depend on them):

    id  token      id  token      id  token
     0  <pad>       7  '3'        14  '+'
     1  <eos>       8  '4'        15  '-'
     2  <bos>       9  '5'        16  '*'
     3  <unk>      10  '6'        17  '='
     4  '0'        11  '7'        18  ' '
     5  '1'        12  '8'        19  '\\n'
     6  '2'        13  '9'
"""
CHAR_VOCAB_SIZE: int = len(CHAR_VOCAB)

# tokenizer_config.json names this class: transformers 4.x (what SGLang servers often pin) and 5.x both map it
# to a plain tokenizer.json-backed tokenizer. transformers 5 would write "TokenizersBackend", unknown to 4.x.
_PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_PLAIN_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def build_char_tokenizer(save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The character-level tokenizer of the generated tasks (vocabulary and ids: ``CHAR_VOCAB``).

    Args:
        save_dir: if given, also `save_pretrained` it there (tokenizer.json, tokenizer_config.json), loadable
            with `load_tokenizer(save_dir)` or `AutoTokenizer.from_pretrained(save_dir)`.
    Returns:
        A fast HF tokenizer with bos/eos/pad/unk set and no chat template.
    """
    tok = Tokenizer(models.WordLevel(CHAR_VOCAB, unk_token=UNK))
    # One pre-token per character ([\s\S] also matches the newline), so WordLevel sees single characters.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # WordLevel would otherwise join tokens with spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, CHAR_VOCAB[BOS])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 unk_token=UNK, model_max_length=1 << 20)
    assert len(hf) == CHAR_VOCAB_SIZE and hf.eos_token_id == CHAR_VOCAB[EOS], (len(hf), hf.eos_token_id)
    if save_dir is not None:
        save_tokenizer(hf, save_dir)
    return hf


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, save_dir: str | Path) -> None:
    """`save_pretrained`, with a tokenizer_class that transformers 4.x and 5.x both load (see above)."""
    save_dir = Path(save_dir)
    tokenizer.save_pretrained(str(save_dir))
    cfg_path = save_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = _PORTABLE_TOKENIZER_CLASS
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The run's tokenizer: the HF tokenizer in directory `path` (model.hf_dir), or the character tokenizer.

    A directory whose tokenizer_config.json names a plain fast tokenizer (as `build_char_tokenizer` writes) is
    loaded straight from its tokenizer.json. Reason: transformers 5's AutoTokenizer picks the tokenizer class of
    the model type in config.json when there is one (e.g. Qwen2Tokenizer for model_type 'qwen2'), which
    re-applies byte-level pre-tokenization and loses the character tokenizer's ' ' and '\\n' (digits and
    '+-*=' survive). Other directories go through AutoTokenizer. A tokenizer without a pad token gets its eos
    token as pad token.

    Args:
        path: HF directory with tokenizer files, or None for `build_char_tokenizer()`.
    Raises:
        ValueError: `path` is not a directory with tokenizer files.
    """
    if path is None:
        tok = build_char_tokenizer()
        logger.info("tokenizer: character-level, %d tokens (eos=%d, pad=%d)", len(tok), tok.eos_token_id,
                    tok.pad_token_id)
        return tok
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model.hf_dir={str(path)!r}: not a directory; expected a Hugging Face model directory "
                         f"with tokenizer files (tokenizer.json / tokenizer_config.json)")
    cfg_path = path / "tokenizer_config.json"
    tok_class = None
    if cfg_path.is_file():
        try:
            tok_class = json.loads(cfg_path.read_text()).get("tokenizer_class")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ValueError(f"{cfg_path}: not a valid tokenizer config ({exc})") from None
    try:
        if tok_class in _PLAIN_TOKENIZER_CLASSES and (path / "tokenizer.json").is_file():
            tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        else:
            tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"model.hf_dir={str(path)!r}: could not load a tokenizer ({exc})") from None
    if tok.eos_token_id is None:
        raise ValueError(f"model.hf_dir={str(path)!r}: the tokenizer has no eos token; the trainer needs one to "
                         f"end responses")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    logger.info("tokenizer: %s from %s, %d tokens (eos=%d, pad=%d, chat template: %s)", type(tok).__name__,
                path, len(tok), tok.eos_token_id, tok.pad_token_id, tok.chat_template is not None)
    return tok
