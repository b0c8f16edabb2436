"""MergeKit's `chat_template:`: `auto`, a built-in name, or a Jinja template string.

`auto` takes the most common template among the input models' tokenizers (base first, then the models in
config order; none: no template is written). A built-in name is one of the templates MergeKit ships (same names,
same rendered prompts; written here from the public formats). Anything else must look like a template (MergeKit's
rule: at least 20 characters with a `{`) and parse with jinja2. The result is written with the output tokenizer,
where transformers reads it (`chat_template.jinja`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError

_CHATML = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_LLAMA3 = (
    "{%- for m in messages -%}"
    "{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

_ALPACA = (
    "{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}"
    "{{- ((system | last).content | trim if system else '') + '\\n\\n' -}}"
    "{%- set heads = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n',"
    " 'user_context': '### Input:\\n'} -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] in heads -%}"
    "{{- heads[m['role']] + m['content'] | trim -}}"
    "{%- if not loop.last -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{- '### Response:\\n' -}}{%- endif -%}"
)

_MISTRAL = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- set text = system + '\\n\\n' + m['content'] if loop.first and system is defined else m['content'] -%}"
    "{{- ' [INST] ' + text + ' [/INST]' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- ' ' + m['content'] + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional "
    "system message!') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# MergeKit's exaone template renders with its file's indentation; so does this one (same prompts).
_EXAONE = (
    "{%- set pad = '    ' -%}"
    "{%- for m in messages -%}"
    "{%- if loop.first and m['role'] != 'system' -%}{{- pad * 2 + '[|system|][|endofturn|]\\n\\n' -}}{%- endif -%}"
    "{{- pad + '[|' + m['role'] + '|]' + m['content'] + '\\n' + pad * 2 -}}"
    "{{- ('\\n' if m['role'] == 'user' else '[|endofturn|]\\n') + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- pad + '[|assistant|]\\n' -}}{%- endif -%}"
)

BUILTIN = {"alpaca": _ALPACA, "chatml": _CHATML, "exaone": _EXAONE, "llama3": _LLAMA3, "mistral": _MISTRAL}


def resolve_template(spec: str | None, tokenizer_dirs: Sequence[Path]) -> str | None:
    """The template text to write (None: leave the tokenizer's own), validated. `tokenizer_dirs`: the unique
    input models, base first. Raises ConfigError naming chat_template."""
    if not spec:
        return None
    if spec == "auto":
        return _most_common(tokenizer_dirs)
    if len(spec) < 256 and "\n" not in spec and "{" not in spec:
        if spec in BUILTIN:
            return BUILTIN[spec]
        raise ConfigError(f"chat_template {spec!r}: not a built-in template ({', '.join(sorted(BUILTIN))}), "
                          f"'auto', or a Jinja template")
    if len(spec) < 20 or "{" not in spec:
        raise ConfigError(f"chat_template: {spec[:40]!r} is not a Jinja template (MergeKit needs 20+ characters "
                          f"with a '{{')")
    check_parses(spec)
    return spec


def check_parses(template: str) -> None:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    try:
        env.parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"chat_template: the Jinja template does not parse (line {e.lineno}: {e.message})") from None


def _most_common(tokenizer_dirs: Sequence[Path]) -> str | None:
    from .vocab import load_tokenizer

    found = []
    for path in tokenizer_dirs:
        try:
            template = load_tokenizer(path, "chat_template").chat_template
        except ConfigError:
            continue  # MergeKit skips a model whose tokenizer does not load
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None
