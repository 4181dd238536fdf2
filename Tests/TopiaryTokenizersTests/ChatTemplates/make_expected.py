#!/usr/bin/env python3
"""Writes expected.json beside this script: what real Jinja2, set up as Hugging Face transformers
sets it up for `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`,
renders from each chat template in this folder over a few conversations, plus a set of small
templates that exercise one construct each. ChatTemplateTests compares Topiary's renderer with it.

The environment mirrors transformers' `_compile_jinja_template` / `render_jinja_template`:
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
(transformers also adds its AssistantTracker extension, whose only effect outside training is to
accept `{% generation %}` blocks; none of these templates use it), its own `tojson` filter
(json.dumps with ensure_ascii=False), the `raise_exception` and `strftime_now` globals, and
render(messages=..., tools=None, documents=None, add_generation_prompt=..., **special tokens,
**extra). strftime_now reads a fixed clock (NOW) so the output does not depend on the day.

Run with: python3 make_expected.py   (needs Jinja2; written against Jinja2 3.1.6)
"""
import datetime
import json
import os
import sys

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))
NOW = datetime.datetime(2025, 3, 7, 9, 5, 3)  # a Friday; read as UTC by the Swift tests


class GenerationTag(Extension):
    """transformers' AssistantTracker, less the tracking: `{% generation %}...{% endgeneration %}`
    renders its body (as a call block, so in a scope of its own)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

    def _generation_support(self, caller):
        return caller()


class Raised(Exception):
    """raise_exception(...) was called: the template refused the conversation."""


def make_env():
    def raise_exception(message):
        raise Raised(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return NOW.strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


ENV = make_env()


def render(source, messages, add_generation_prompt, bos, eos, extra):
    context = {"messages": messages, "tools": None, "documents": None, "add_generation_prompt": add_generation_prompt}
    if bos is not None:
        context["bos_token"] = bos
    if eos is not None:
        context["eos_token"] = eos
    context.update(extra)  # transformers takes `tools` as its own argument; here it comes through `extra`
    try:
        template = ENV.from_string(source)
        text = template.render(**context)
        return {"expected": text}
    except Raised as e:
        return {"raised": str(e)}
    except jinja2.TemplateError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    except Exception as e:  # TypeError and the like: a render error for Topiary too
        return {"error": f"{type(e).__name__}: {e}"}


def m(role, content):
    return {"role": role, "content": content}


SYSTEM = m("system", "You are a terse assistant.\nAnswer in one line.")
USER1 = m("user", "  What is the capital of France? ")
ASSISTANT1 = m("assistant", "Paris. It has been the capital since 987 — « Île-de-France ».")
USER2 = m("user", "And of 日本? Say it with an emoji 😀 and \"quotes\" and 'apostrophes' and a tab\t.")
ASSISTANT2 = m("assistant", "Tokyo.\n")

CONVERSATIONS = {
    "system_user": [SYSTEM, USER1],
    "user_only": [USER1],
    "multi_turn": [SYSTEM, USER1, ASSISTANT1, USER2],
    "multi_turn_no_system": [USER1, ASSISTANT1, USER2, ASSISTANT2],
    "two_systems": [SYSTEM, USER1, ASSISTANT1, m("system", "Now answer in French."), USER2],
    "user_user": [USER1, USER2],
    "thinking": [USER1, m("assistant", "<think>\nThe user asks about France.\n</think>\n\nParis."), USER2],
}

# Tool use: a conversation whose messages carry more than role and content, and the tools a
# request offers. Topiary's ChatMessage has role and content only; the tests hand these over
# as template variables (`messages`, `tools`), which exercises the templates' other paths.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TOOL_CONVERSATIONS = {
    "tool_call": [
        SYSTEM,
        m("user", "What is the weather in Paris?"),
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "call12345", "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "{\"temperature\": 21}"},
    ],
}
TOOLS = {"tools": [WEATHER_TOOL]}

# (template file, bos token, eos token, conversations to render, extra variables)
TEMPLATES = [
    ("HuggingFaceTB-SmolLM2-135M-Instruct.jinja", "<|im_start|>", "<|im_end|>",
     ["system_user", "user_only", "multi_turn", "multi_turn_no_system"], [{}]),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
     ["system_user", "user_only", "multi_turn", "multi_turn_no_system"], [{}, {"date_string": "01 Jan 2030"}]),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
     ["tool_call"], [TOOLS, {**TOOLS, "tools_in_user_message": False}]),
    ("meta-llama-Llama-3.3-70B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
     ["system_user", "user_only", "multi_turn", "multi_turn_no_system"], [{}]),
    ("meta-llama-Llama-3.3-70B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
     ["tool_call"], [TOOLS, {**TOOLS, "builtin_tools": ["code_interpreter", "brave_search", "wolfram_alpha"]}]),
    ("Qwen-Qwen2.5-7B-Instruct.jinja", None, "<|im_end|>",
     ["system_user", "user_only", "multi_turn", "multi_turn_no_system", "two_systems"], [{}]),
    ("Qwen-Qwen2.5-7B-Instruct.jinja", None, "<|im_end|>", ["tool_call"], [TOOLS]),
    ("Qwen-Qwen3-0.6B.jinja", None, "<|im_end|>",
     ["system_user", "user_only", "multi_turn", "multi_turn_no_system", "two_systems", "thinking"],
     [{}, {"enable_thinking": False}]),
    ("Qwen-Qwen3-0.6B.jinja", None, "<|im_end|>", ["tool_call"], [TOOLS]),
    ("mistralai-Mixtral-8x7B-Instruct-v0.1.jinja", "<s>", "</s>",
     ["system_user", "user_only", "multi_turn", "multi_turn_no_system", "user_user", "two_systems"], [{}]),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>",
     ["system_user", "user_only", "multi_turn", "multi_turn_no_system", "user_user", "two_systems"], [{}]),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>", ["tool_call"], [TOOLS]),
    ("mistralai-Mistral-Nemo-Instruct-2407-earlier.jinja", "<s>", "</s>",
     ["system_user", "user_only", "multi_turn", "multi_turn_no_system", "user_user", "two_systems", "tool_call"], [{}]),
    ("mistralai-Mistral-Nemo-Instruct-2407-earlier.jinja", "<s>", "</s>", ["tool_call"], [TOOLS]),
    ("mistralai-Mistral-Small-3.1-24B-Instruct-2503.jinja", "<s>", "</s>",
     ["system_user", "user_only", "multi_turn", "multi_turn_no_system", "user_user", "two_systems"], [{}]),
    ("mistralai-Mistral-Small-3.1-24B-Instruct-2503.jinja", "<s>", "</s>", ["tool_call"], [TOOLS]),
    ("google-gemma-2-2b-it.jinja", "<bos>", "<eos>",
     ["system_user", "user_only", "multi_turn_no_system", "user_user"], [{}]),
    ("microsoft-Phi-3-mini-4k-instruct.jinja", "<s>", "<|endoftext|>",
     ["system_user", "user_only", "multi_turn", "multi_turn_no_system"], [{}]),
    ("microsoft-Phi-3.5-mini-instruct.jinja", "<s>", "<|endoftext|>",
     ["system_user", "user_only", "multi_turn", "multi_turn_no_system", "two_systems"], [{}]),
]

# Small templates, one construct (or a few related ones) each: name, source.
FEATURES = [
    ("concat", "{{ 'a' ~ 1 ~ none ~ true ~ undefined_name ~ 2.5 }}"),
    ("loop_vars", "{% for x in ['a', 'b', 'c'] %}{{ loop.index0 }}{{ loop.index }}{{ loop.first }}{{ loop.last }}"
                  "{{ loop.length }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.previtem }}{{ loop.nextitem }}|{% endfor %}"),
    ("loop_filter", "{% for x in range(10) if x is odd %}{{ x }}{{ ',' if not loop.last }}{% endfor %}/{{ range(2, 9, 3)|list }}"),
    ("loop_else", "{% for x in [] %}x{% else %}empty{% endfor %}{% for x in [1] if x > 5 %}y{% else %}filtered{% endfor %}"),
    ("loop_unpack", "{% for k, v in {'a': 1, 'b': 2}|items %}{{ k }}={{ v }};{% endfor %}"
                    "{% for k, v in {'c': 3}.items() %}{{ k }}{{ v }}{% endfor %}{% for k in {'x': 1, 'y': 2} %}{{ k }}{% endfor %}"),
    ("loop_nested", "{% for a in [1, 2] %}{% for b in [3, 4] %}{{ loop.index }}{{ b }}{% endfor %}-{{ loop.index }}{{ a }} {% endfor %}"),
    ("loop_string", "{% for c in 'héllo😀' %}[{{ c }}]{% endfor %}"),
    ("loop_controls", "{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 5 %}{% break %}{% endif %}{{ x }}{% endfor %}"),
    ("loop_cycle", "{% for x in 'abc' %}{{ loop.cycle('+', '-') }}{{ x }}{% endfor %}"),
    ("namespace", "{% set ns = namespace(n=0, s='') %}{% for x in [1, 2, 3] %}{% set ns.n = ns.n + x %}"
                  "{% set ns.s = ns.s ~ x %}{% endfor %}{{ ns.n }} {{ ns.s }}{% set ns2 = namespace() %}{% set ns2.a = 'z' %}{{ ns2.a }}"),
    ("scoping", "{% set a = 1 %}{% for x in [1, 2] %}{% if true %}{% set a = a + x %}{% endif %}{{ a }}{% endfor %}{{ a }}"
                "{% set acc = [] %}{% for x in [1, 2] %}{% set acc = acc + [x] %}{% endfor %}{{ acc|length }}"),
    ("slicing", "{{ [1, 2, 3, 4][1:] }}{{ 'hello'[::-1] }}{{ [1, 2, 3][-1] }}{{ 'abcdef'[1:5:2] }}{{ 'abc'[:-1] }}"
                "{{ [1, 2, 3][5:] }}{{ 'héllo😀'[1:3] }}{{ 'héllo😀'[-1] }}{{ [1, 2, 3, 4, 5][::-2] }}{{ 'x'[10:] }}"),
    ("tojson", "{{ {'a': [1, 2.5, none, true, false], 'b': 'é\"\\n\\t\\\\<&>', 'c': {}, 'd': []}|tojson }}\n"
               "{{ {'a': [1, {'x': none}], 'e': {}, 'f': []}|tojson(indent=2) }}\n{{ 'x'|tojson }}{{ 3|tojson }}\n"
               "{{ {'b': 1, 'a': [1, 2]}|tojson(separators=(',', ':'), sort_keys=true) }}{{ messages[0]|tojson }}\n"
               "{{ [1e16, 1.0, 0.1, -0.0, 1e-5, 123.456]|tojson }}{{ '\\x01\\x7f\\u2028'|tojson }}"),
    ("string_methods", "{{ '  x y  '.strip() }}|{{ 'a,b,,c'.split(',') }}|{{ ' a b  c '.split() }}|{{ 'xxhixx'.strip('x') }}|"
                       "{{ 'Hello'.startswith('He') }}{{ 'Hello'.endswith('lo') }}{{ 'Hello'.startswith(('x', 'H')) }}|{{ 'abc'.upper() }}|"
                       "{{ 'A b'.lower() }}|{{ 'hello wORLD-x'.title() }}|{{ 'hello'.replace('l', 'L') }}|{{ '\\n\\nx\\n'.lstrip('\\n') }}|"
                       "{{ 'x\\n\\n'.rstrip() }}|{{ 'abc'.find('c') }}{{ 'abc'.find('z') }}|{{ 'a-b-c'.split('-', 1) }}|"
                       "{{ 'hELLO'.capitalize() }}|{{ 'a</think>b</think>c'.split('</think>')[-1] }}|{{ 'aXbXc'.rsplit('X', 1) }}|"
                       "{{ 'a\\nb\\r\\nc'.splitlines() }}|{{ 'ababab'.count('ab') }}|{{ ','.join(['p', 'q']) }}|{{ 'abc'.replace('', '-') }}"),
    ("filters", "{{ ' a '|trim }}|{{ 'xxaxx'|trim('x') }}|{{ [1, 2]|length }}|{{ 'héllo'|count }}|{{ 'abc'|upper }}|{{ 'ABC'|lower }}|"
                "{{ 'hello WORLD'|capitalize }}|{{ 'hello-world foo(bar)'|title }}|{{ 'aaa'|replace('a', 'b', 2) }}|"
                "{{ undefined_thing|default('dflt') }}|{{ ''|default('e', true) }}|{{ none|default('d') }}|{{ [1, 2, 3]|join('-') }}|"
                "{{ [1, 2, 3]|first }}|{{ [1, 2, 3]|last }}|{{ 'ab'|list }}|{{ 12|string }}|{{ '42'|int + 1 }}|{{ '4.7'|int }}|"
                "{{ 'x'|int }}|{{ 'x'|int(7) }}|{{ 3.9|int }}|{{ true|int }}|{{ '1.5'|float }}|{{ [3, 1, 2]|sort }}|"
                "{{ ['b', 'A', 'c']|sort }}|{{ [1, 2]|reverse|list }}|{{ 'abc'|reverse }}|{{ -3|abs }}|{{ {'b': 1, 'a': 2}|list }}|"
                "{{ [1, 2, 3]|sum }}|{{ [4, 2, 8]|min }}{{ [4, 2, 8]|max }}|{{ [1, 2, 1, 3]|unique|list }}|{{ 2.567|round(1) }}|"
                "{{ 'a\\nb'|indent(2) }}|{{ 'a\\nb'|indent(2, true) }}|{{ {'k': 'v'}|items|list }}|{{ [[1, 2], [3]]|map('length')|list }}"),
    ("select_map", "{{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|map('trim')|list }}|"
                   "{{ messages|rejectattr('role', 'eq', 'user')|map(attribute='role')|join(',') }}|"
                   "{{ messages|selectattr('missing', 'undefined')|list|length }}|{{ messages|selectattr('content')|list|length }}|"
                   "{{ [1, 2, 3, 4]|select('even')|list }}{{ [1, 2, 3, 4]|reject('odd')|list }}{{ [0, 1, '', 'a']|select|list }}|"
                   "{{ ['a', 'b']|map('upper')|join }}|{{ messages|join(', ', attribute='role') }}|"
                   "{{ messages|map(attribute='nope', default='?')|join }}|{{ [3, 1, 2]|select('gt', 1)|list }}"),
    ("tests", "{{ x is defined }}{{ none is none }}{{ 'a' is string }}{{ 1 is number }}{{ true is number }}{{ [1] is iterable }}"
              "{{ 'a' is iterable }}{{ {} is mapping }}{{ 3 is odd }}{{ 4 is even }}{{ 4 is divisibleby(3) }}{{ 1 is sameas 1 }}"
              "{{ x is not defined }}{{ true is boolean }}{{ 'ab' is lower }}{{ 'AB' is upper }}{{ 2 is integer }}{{ true is integer }}"
              "{{ 2.0 is float }}{{ false is false }}{{ 0 is false }}{{ 1 is true }}{{ 2 is eq 2 }}{{ 2 is ne(2) }}{{ 3 is gt 2 }}"
              "{{ 3 is le 2 }}{{ 'a' is in 'cat' }}{{ [1] is sequence }}{{ 5 is sequence }}{{ none is undefined }}{{ messages is defined }}"
              "{{ strftime_now is defined }}{{ raise_exception is callable }}"),
    ("membership", "{{ 'a' in 'cat' }}{{ 1 in [1, 2] }}{{ 'k' in {'k': 1} }}{{ 3 not in [1] }}{{ 'role' in messages[0] }}"
                   "{{ 'tool_calls' in messages[0] }}{{ {'role': 'system', 'content': messages[0].content} in messages }}{{ 'x' in nothing }}"),
    ("logic", "{{ 1 < 2 < 3 }}{{ 3 > 2 > 2 }}{{ 1 == 1.0 }}{{ 'a' < 'b' }}{{ 0 or 'x' }}{{ 1 and 'y' }}{{ not 0 }}{{ [] or 'empty' }}"
              "{{ none == none }}{{ undefined_a == undefined_b }}{{ 'a' != 'b' }}{{ [1, [2]] == [1, [2]] }}{{ {'a': 1, 'b': 2} == {'b': 2, 'a': 1} }}"
              "{{ 1 != 'a' }}{{ not 1 == 2 }}{{ (1 == 1) != (2 == 3) }}{{ [1, 2] < [1, 3] }}{{ true == 1 }}"),
    ("ternary", "{{ 'yes' if 1 else 'no' }}{{ 'x' if 0 }}|{{ 'a' if false else 'b' if false else 'c' }}{{ ('p' if true else 'q')|upper }}"),
    ("math", "{{ 7 // 2 }} {{ 7 / 2 }} {{ -7 % 3 }} {{ 7 % -3 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 1.5 * 2 }} {{ 'ab' * 2 }} {{ 10 - 3 - 2 }}"
             " {{ -3 + 1 }} {{ 2 + 3 * 4 }} {{ (2 + 3) * 4 }} {{ 1_000 + 1 }} {{ 1.5e3 }} {{ 6 / 3 }} {{ -7 // 2 }} {{ 7.5 // 2 }}"
             " {{ [1] * 3 }} {{ 0.1 + 0.2 }} {{ 1e20 }} {{ -2 ** 2 }} {{ 2 ** 3 ** 2 }}"),
    ("macro", "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('Bob') }} {{ greet('Al', punct='?') }}"
              " {{ greet(name='Cy') }}{% macro row(m) -%}\n  <{{ m.role }}>\n{%- endmacro %}{% for m in messages %}{{ row(m) }}{% endfor %}"),
    ("set_block", "{% set x %}inner {{ 1 + 1 }}{% endset %}[{{ x }}]{% set a, b = 1, 'two' %}{{ a }}{{ b }}"),
    ("literals", "{% set d = {'a': {'b': [10, 20,]}, \"c\": 'C',} %}{{ d.a.b[1] }}{{ d['a']['b'][0] }}{{ d.a.missing is defined }}"
                 "{{ d.c }}{{ d['c'] }}{{ d.a.b.0 }}{{ [] }}{{ {} }}{{ True }}{{ False }}{{ None }}{{ 'adj' \"acent\" }}"),
    ("string_escapes", "{{ 'tab\\there' }}|{{ \"q\\\"uote\" }}|{{ 'line\\\ncont' }}|{{ '\\u00e9\\x41\\101' }}|{{ 'back\\\\slash' }}|"
                       "{{ 'unknown\\q' }}|{{ 'multi\nline' }}|{{ 'é\\é' }}|{{ '\\U0001F600' }}"),
    ("repr", "{{ ['a', \"b'c\", 'd\"e\\'f', 1, 2.5, none, true, {'k': 'v'}, 'é\\n\\x01'] }}|{{ ['a']|string }}|{{ {'a': [1]} }}|"
             "{{ 'x' ~ [1, 'y'] }}|{{ 2.0 }}{{ 1e16 }}{{ 1e15 }}{{ 0.0001 }}{{ 1e-5 }}"),
    ("dict_methods", "{{ {'a': 1}.get('a') }}{{ {'a': 1}.get('b') }}{{ {'a': 1}.get('b', 'd') }}{{ {'a': 1, 'b': 2}.keys()|list }}"
                     "{{ {'a': 1, 'b': 2}.values()|list }}{{ messages[0].get('role') }}"),
    ("plus", "{{ 'a' + 'b' }}{{ [1] + [2] }}{{ 1 + 2.5 }}{{ messages[1:]|length }}{{ (messages + messages)|length }}"),
    ("unicode", "{{ 'héllo😀'|length }}{{ 'é😀ß'|upper }}{{ 'ÉCOLE'|lower }}{{ 'e\u0301' == '\u00e9' }}{{ ('e\u0301')|length }}{{ 'ß' < 'z' }}"),
    ("strftime", "{{ strftime_now('%Y-%m-%d %H:%M:%S %a %A %b %B %j %p %I %y %d %e %m %%') }}|{{ strftime_now('%d %b %Y') }}|"
                 "{{ strftime_now('%-d %-m %-H %k %l %F %T %D %R %c %x %X %u %w %C [%Z] [%z]') }}"),
    ("odd_subscripts", "{{ none[1:] is defined }}{{ 5[0] is defined }}{{ {'a': 1}[0] is defined }}{{ [1, 2]['x':] is defined }}"
                       "{{ 'abc'[1:none] }}{{ [1, 2, 3][none:2] }}"),
    ("whitespace", "<ul>\n  {% for x in [1, 2] %}\n    <li>{{ x }}</li>\n  {% endfor %}\n</ul>\n{# comment #}\n"
                   "  {%+ if true %}kept{% endif +%}\n  {{- ' minus' -}}  \n  end  {#- c -#}  b\n"
                   "\t{% if true %}\ttab{% endif %}\n{{ 'v' }}\n  {{ 'indented var' }}\n  {%- if true %}x{% endif -%}\n\n\ny\n"
                   "line{% if true %}\nnext{% endif %}\n\n"),
    ("whitespace_crlf", "a\r\n  {% if true %}\r\nb\r\n  {% endif %}\r\nc\r\n"),
    ("trailing_newline", "x\n"),
    ("trailing_newlines", "x\n\n"),
    ("comment_lines", "{# a comment #}\nline1\n    {# indented comment #}\nline2\n{#- stripped #}\n{#+ kept +#}\nend"),
    ("vars_and_tokens", "{{ bos_token }}|{{ eos_token }}|{{ tools }}|{{ documents }}|{{ add_generation_prompt }}|{{ messages|length }}"),
    ("generation_tag", "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
                       "{% else %}{{ m.role }}{% endif %}{% endfor %}"),
    ("whitespace_edges", "   {% if true %}a{% endif %}\n{{ 'v' }}   {% if true %}b{% endif %}\n{# c #}   {% if true %}c{% endif %}\n"
                         "{% if true %}\n   {% if true %}d{% endif %}\n{% endif %}\n{% if true -%}  \n  e{% endif %}\n"
                         "abc  \n  {%- if true %}f{% endif %}\n  {{- 'g' }}\n\t \t{% if true %}h\n\t{% endif %}\n"
                         "  {#- c #}i\n{% if true %} \n{% endif %}j{%- if true -%}\n\n k \n\n{%- endif -%}\n\nl"),
    ("tags_in_strings", "{{ '{{ not a tag }}' }}|{{ {'a': {'b': 1}} }}|{% set d = {'k': {'n': 1}}%}{{ d.k.n }}|{# {{ x }} %} #}|"
                        "{{ \"%}\" }}|{{ '#}' }}"),
    ("macro_scope", "{% set x = 1 %}{% macro m() %}{{ x }}{% endmacro %}{% set x = 2 %}{{ m() }}|"
                    "{% macro loop_in(items) %}{% for i in items %}{{ loop.index }}{{ i }}{% endfor %}{% endmacro %}{{ loop_in('ab') }}|"
                    "{% for m in messages %}{% macro role() %}<{{ m.role }}>{% endmacro %}{{ role() }}{% endfor %}|"
                    "{% macro r(n) %}{% if n > 0 %}{{ n }}{{ r(n - 1) }}{% endif %}{% endmacro %}{{ r(3) }}|"
                    "{% macro opt(a, b=a ~ '!') %}{{ a }}{{ b }}{{ c }}{% endmacro %}{{ opt('x') }}{{ opt('y', 'z') }}"),
    ("message_access", "{{ messages[-1].content }}|{{ messages[1:-1]|map(attribute='role')|join(',') }}|"
                       "{% for m in messages if m.role != 'system' %}{{ loop.index }}:{{ m.role }} {% endfor %}|"
                       "{{ (messages|first).role }}{{ (messages|last)['role'] }}|{{ messages|map(attribute='role')|unique|list }}|"
                       "{{ 'yes' if not messages else 'no' }}|{{ messages[0]['role'][0]|upper }}|{{ messages.0.role }}"),
    ("more_filters", "{{ none|string }}|{{ none|tojson }}|{{ 'x'|default }}|{{ undefined|default }}|{{ [1, 2, 3]|join }}|{{ 1 if true }}|"
                     "{{ 5 is divisibleby 3 }}|{{ range(3)|list }}{{ range(5, 0, -2)|list }}|{% for i in range(3) %}{{ i }}{% endfor %}|"
                     "{{ -7.5 // 2 }}|{{ 3 / 2 * 2 }}|{{ 'multi' ~ '\\n' }}|{{ ('a', 'b')|join('+') }}|{{ 'abc'|first }}{{ 'abc'|last }}|"
                     "{{ {'a': 1}|length }}|{{ [none, 0, '']|select('none')|list }}|{{ [1, 2]|map('string')|join('.') }}|"
                     "{{ 'Ab'|lower is lower }}|{{ 2.0|int }}|{{ '  7 '|int }}|{{ '1_000'|int }}|{{ '0x1A'|int }}|{{ '-3'|int }}|"
                     "{{ ['b', 'a', 'C']|sort(reverse=true) }}|{{ [{'n': 2}, {'n': 1}]|sort(attribute='n')|map(attribute='n')|list }}|"
                     "{{ ['x', 'X', 'y']|unique|list }}|{{ ['x', 'X']|unique(case_sensitive=true)|list }}|{{ 'tEST'|capitalize }}|"
                     "{{ 1.0|round }}{{ 2.5|round }}{{ 3.5|round }}{{ 2.675|round(2) }}{{ 7|round }}{{ 1.25|round(1, 'floor') }}|"
                     "{{ [1.5, 2]|sum }}|{{ [{'n': 1}, {'n': 2}]|sum(attribute='n') }}|{{ ['a', 'B']|max }}|{{ 'x\ny\n'|indent(first=true) }}"),
    ("more_tests", "{{ 'a' is in ['a'] }}{{ none is not none }}{{ 'x' is not string }}{{ 1.5 is number }}{{ '1' is number }}"
                   "{{ (1, 2) is sequence }}{{ namespace() is mapping }}{{ 0 is even }}{{ -3 is odd }}{{ false is boolean }}"
                   "{{ 1 is boolean }}{{ 'abc' is upper }}{{ 'A1' is upper }}{{ '' is lower }}{{ messages[0] is mapping }}"
                   "{{ messages is iterable }}{{ 3 is ge 3 }}{{ 3 is lt 3 }}{{ 'b' is greaterthan 'a' }}"),
    ("items_of_namespace", "{% set ns = namespace(a=1) %}{% set ns.b = [1] %}{% set ns.a = ns.a + 1 %}{{ ns.a }}{{ ns.b }}{{ ns['a'] }}"
                           "{{ ns.missing is defined }}{% set ns2 = namespace({'x': 'y'}, z=3) %}{{ ns2.x }}{{ ns2.z }}"),
    ("raise", "{% if messages|length > 1 %}{{ raise_exception('too many: ' ~ messages|length) }}{% endif %}"),
    ("raise_in_macro", "{% macro check(m) %}{% if m.role == 'assistant' %}{{ raise_exception('no ' ~ m.role ~ ' here') }}{% endif %}"
                       "{% endmacro %}{% for m in messages %}{{ check(m) }}{% endfor %}"),
    ("undefined_attribute_error", "{{ nothing.attr }}"),
    ("undefined_item_error", "{{ messages[0].nope.deeper }}"),
    ("compare_type_error", "{{ 1 < 'a' }}"),
    ("iterate_error", "{% for x in 3 %}{% endfor %}"),
    ("tojson_undefined_error", "{{ nothing|tojson }}"),
    ("division_error", "{{ 1 // 0 }}"),
    ("type_error", "{{ 'a' + 1 }}"),
    ("undefined_concat_error", "{{ 'a' + nothing }}"),
    ("empty_messages_error", "{{ messages[5]['role'] }}"),
]

# The conversation the feature templates render.
FEATURE_CONVERSATION = "multi_turn"


def ordered(value):
    """JSON objects as {"__object__": [[key, value], ...]}, so that a reader keeps their key order
    (json.dumps, hence `tojson`, writes keys in that order)."""
    if isinstance(value, dict):
        return {"__object__": [[k, ordered(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return [ordered(v) for v in value]
    return value


def main():
    out = {
        "generator": "make_expected.py, Jinja2 " + jinja2.__version__,
        "now": NOW.isoformat(),
        "conversations": CONVERSATIONS,
        "tool_conversations": {k: ordered(v) for k, v in TOOL_CONVERSATIONS.items()},
        "cases": [],
        "features": [],
    }
    for fname, bos, eos, convs, extras in TEMPLATES:
        with open(os.path.join(HERE, fname), encoding="utf-8", newline="") as f:
            source = f.read()
        for extra in extras:
            for conv in convs:
                for agp in (True, False):
                    case = {
                        "template": fname,
                        "conversation": conv,
                        "add_generation_prompt": agp,
                        "bos_token": bos,
                        "eos_token": eos,
                        "extra": ordered(extra),
                    }
                    messages = CONVERSATIONS[conv] if conv in CONVERSATIONS else TOOL_CONVERSATIONS[conv]
                    case.update(render(source, messages, agp, bos, eos, extra))
                    out["cases"].append(case)
    for name, source in FEATURES:
        case = {"name": name, "source": source, "conversation": FEATURE_CONVERSATION, "add_generation_prompt": True,
                "bos_token": "<s>", "eos_token": "</s>", "extra": ordered({})}
        case.update(render(source, CONVERSATIONS[FEATURE_CONVERSATION], True, "<s>", "</s>", {}))
        out["features"].append(case)
    with open(os.path.join(HERE, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    n_err = sum(1 for c in out["cases"] + out["features"] if "expected" not in c)
    print(f"{len(out['cases'])} template cases, {len(out['features'])} feature cases, {n_err} refusals/errors", file=sys.stderr)


if __name__ == "__main__":
    main()
