"""Template rendering: the seeds' examples, steps and explicit roots, JSONPath, missing
paths, lists, unicode and hostile input."""

from __future__ import annotations

import orjson
import pytest

from ipaas.templates import RenderContext, TemplateError, compile_template, render, render_config, validate_template

PAYLOAD = {
    "user": {"name": "Alex", "email": "alex@example.com", "tags": ["a", "b"]},
    "order": {"id": "12345", "total": 42.5, "paid": True, "note": None, "items": [{"name": "Book", "qty": 1, "sku": "B1"}, {"name": "Pen", "qty": 3, "sku": "P9"}]},
    "items": [1, 2, 3],
    "städte": {"zürich": "☀️ sonnig"},
    "first name": "Ann",
    "weird-key": {"x.y": 1},
}
CTX = RenderContext(trigger=PAYLOAD, steps={"weather": {"temperature": 21.5, "city": "Paris"}})


@pytest.mark.parametrize(
    "template,expected,missing",
    [
        ("Hello {{user.name}}, your order {{order.id}} shipped!", "Hello Alex, your order 12345 shipped!", ()),
        ("Hello {{user.name}}, your email is {{user.email}}", "Hello Alex, your email is alex@example.com", ()),
        ("{{order.items.0.name}}", "Book", ()),
        ("{{order.items.1.qty}}", "3", ()),
        ("{{order.items.-1.sku}}", "P9", ()),
        ("{{items.#}}", "3", ()),
        ("{{order.items.#}} items", "2 items", ()),
        ("{{user.name.#}}", "4", ()),
        ("{{ user.name }}", "Alex", ()),
        ("{{trigger.user.name}}", "Alex", ()),
        ("{{steps.weather.temperature}}°C in {{steps.weather.city}}", "21.5°C in Paris", ()),
        ("{{$.order.items[?@.qty > 1].sku}}", "P9", ()),
        ("{{$.items[*]}}", "[1,2,3]", ()),
        ("{{order.total}}", "42.5", ()),
        ("{{order.paid}}", "true", ()),
        ("{{order.note}}", "", ()),
        ("{{user.tags}}", '["a","b"]', ()),
        ("{{order.items.0}}", '{"name":"Book","qty":1,"sku":"B1"}', ()),
        ("{{städte.zürich}}", "☀️ sonnig", ()),
        ("{{first name}}", "Ann", ()),
        ("no templates here", "no templates here", ()),
        ("{{user.missing}}!", "!", ("user.missing",)),
        ("{{order.items.9.name}}", "", ("order.items.9.name",)),
        ("{{steps.nope.value}}", "", ("steps.nope.value",)),
        ("{{$.nothing}}", "", ("$.nothing",)),
        ("{{user.name.first}}", "", ("user.name.first",)),
        ("{{__class__}}", "", ("__class__",)),
        ("{{user.__dict__}}", "", ("user.__dict__",)),
        ("{{user.name.__class__.__mro__}}", "", ("user.name.__class__.__mro__",)),
        ("{{ ''.join }}", "", ("''.join",)),
        ("{{items.x}}", "", ("items.x",)),
        # str.isdigit() is true for these, int() refuses "²" and reads "٠" as 0: an index is
        # ASCII digits only, anything else is a key a list does not have.
        ("{{items.²}}", "", ("items.²",)),
        ("{{items.-²}}", "", ("items.-²",)),
        ("{{items.٠}}", "", ("items.٠",)),
        ("{{items.--1}}", "", ("items.--1",)),
        ("{{items.+1}}", "", ("items.+1",)),
        ("unclosed {{user.name", "unclosed {{user.name", ()),
        ("{{user.name}}{{user.name}}", "AlexAlex", ()),
    ],
)
def test_render_table(template: str, expected: str, missing: tuple[str, ...]) -> None:
    result = render(template, CTX)
    assert result.value == expected
    assert result.missing_paths == missing


def test_render_config_applies_to_nested_strings_only() -> None:
    config = {"text": "Hi {{user.name}}", "blocks": [{"t": "{{order.id}}"}, 3, None], "n": 5, "{{user.name}}": "key untouched"}
    result = render_config(config, CTX)
    assert result.value == {"text": "Hi Alex", "blocks": [{"t": "12345"}, 3, None], "n": 5, "{{user.name}}": "key untouched"}
    assert result.missing_paths == ()
    assert config["text"] == "Hi {{user.name}}", "the input is not changed"


def test_missing_paths_are_reported_once() -> None:
    result = render_config({"a": "{{x.y}}", "b": ["{{x.y}}", "{{z}}"]}, CTX)
    assert result.missing_paths == ("x.y", "z")


def test_deeply_nested_payload_is_harmless() -> None:
    deep: dict = {}
    node = deep
    for _ in range(10_000):
        node["a"] = {}
        node = node["a"]
    node["v"] = "bottom"
    ctx = RenderContext(trigger=deep)
    assert render("{{" + ".".join(["a"] * 250) + ".zz}}", ctx).missing_paths  # deep paths walk fine
    with pytest.raises(TemplateError):
        render("{{a.a.a}}", ctx)  # 10,000 levels cannot be rendered as JSON: a clear error, no crash
    assert render("{{" + ".".join(["a"] * 50) + ".zz}}", ctx).missing_paths


def test_deeply_nested_config_is_refused() -> None:
    config: object = "x"
    for _ in range(100):
        config = [config]
    with pytest.raises(TemplateError):
        render_config(config, CTX)


def test_an_unexpected_error_while_rendering_is_a_template_error() -> None:
    # The executor fails a step for good on TemplateError; any other exception left the
    # execution running, claimed again at every lease expiry.
    class Hostile(dict):
        def get(self, *args: object) -> object:
            raise RuntimeError("boom")

    with pytest.raises(TemplateError, match="user.name"):
        render_config({"text": "{{user.name}}"}, RenderContext(trigger=Hostile(user={})))


def test_invalid_templates_are_reported() -> None:
    assert validate_template("{{$.items[?}}")
    assert validate_template("{{}}")
    assert validate_template("{{a..b}}")
    assert validate_template("ok {{user.name}}") == []
    with pytest.raises(TemplateError):
        compile_template("{{x}}" * 1001)


@pytest.mark.parametrize(
    "template",
    [
        "{{$[?match(@.s, '(a+)+b')]}}",
        "{{$[?search(@.s, '(a+)+b')]}}",
        "{{$.order.items[?match(@.sku, @.name)]}}",
        "{{$[?@.s =~ /(a+)+b/]}}",
        "{{$[?@.s =~ /(a+)+b/i]}}",
    ],
)
def test_regular_expressions_are_refused(template: str) -> None:
    # Python's re backtracks: "(a+)+b" against 27 "a"s took 9 s on the event loop, which
    # no timeout can interrupt. So a template may not hold a regular expression at all.
    problems = validate_template(template)
    assert problems and "regular expressions" in problems[0], problems
    with pytest.raises(TemplateError):
        render(template, RenderContext(trigger=[{"s": "a" * 40 + "!"}]))


def test_jsonpath_filters_without_regular_expressions_still_work() -> None:
    assert render("{{$.order.items[?@.name == 'Pen'].sku}}", CTX).value == "P9"
    assert render("{{$.order.items[?length(@.name) == 4].sku}}", CTX).value == "B1"
    assert render("{{$.order.items[?startswith(@.sku, 'P')].name}}", CTX).value == "Pen"


def test_compiled_templates_are_cached() -> None:
    compile_template.cache_clear()
    render("cached {{user.name}}", CTX)
    render("cached {{user.name}}", CTX)
    info = compile_template.cache_info()
    assert info.hits >= 1 and info.misses == 1


def test_rendering_a_config_leaves_no_reference_cycle() -> None:
    """Each step renders its config; what it built must go when it does, not wait for the
    garbage collector (a recursive closure once kept every step's context that way)."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        ctx = RenderContext(trigger={"user": {"name": "Ada"}})
        kept = weakref.ref(ctx)
        result = render_config({"text": "hi {{trigger.user.name}}", "blocks": [{"t": "{{trigger.user.name}}"}]}, ctx)
        assert result.value == {"text": "hi Ada", "blocks": [{"t": "Ada"}]}
        del ctx
        assert kept() is None, "freed by reference counting alone"
    finally:
        gc.enable()


def test_a_string_that_is_one_template_gives_the_value_with_its_type() -> None:
    ctx = RenderContext(trigger={"loc": {"lat": 48.85}, "items": [1, 2], "flag": False, "none": None})
    config = {"lat": "{{loc.lat}}", "items": "{{items}}", "flag": "{{ flag }}", "none": "{{none}}", "text": "at {{loc.lat}}", "gone": "{{nope}}"}
    result = render_config(config, ctx)
    assert result.value == {"lat": 48.85, "items": [1, 2], "flag": False, "none": None, "text": "at 48.85", "gone": ""}
    assert result.missing_paths == ("nope",)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ('{{"{{"}}name}}', "{{name}}"),
        ("{{'{{'}}name}}", "{{name}}"),
        ('{{ "{{" }}user.name}} is {{user.name}}', "{{user.name}} is Alex"),
        ('Handlebars: {{"{{"}}#each items}}{{"{{"}}this}}{{"{{"}}/each}}', "Handlebars: {{#each items}}{{this}}{{/each}}"),
        ('{{"{{"}}', "{{"),
        ("}} alone is text", "}} alone is text"),
    ],
)
def test_a_literal_double_brace_is_written_as_a_quoted_template(template: str, expected: str) -> None:
    """A Slack message that must show `{{name}}`, or a Handlebars snippet for an upstream:
    before, every `{{` opened a template, and the text could not be sent at all."""
    result = render(template, CTX)
    assert (result.value, result.missing_paths) == (expected, ())
    assert render_config({"text": template}, CTX).value == {"text": expected}  # the engine's and dry run's way
    assert validate_template(template) == []


def test_an_escape_alone_is_text_not_a_value() -> None:
    from ipaas.templates import step_references, template_paths

    assert render_config({"a": '{{"{{"}}', "b": "{{'{{'}}x{{'{{'}}"}, CTX).value == {"a": "{{", "b": "{{x{{"}
    assert template_paths('{{"{{"}}steps.x.y}}') == [] and step_references('{{"{{"}}steps.x.y}}') == []


@pytest.mark.parametrize(
    ("number", "text"),
    [
        (0.1 + 0.2, "0.30000000000000004"),
        (1e-7, "1e-7"),
        (1.5e-7, "1.5e-7"),
        (0.000001, "0.000001"),
        (1e16, "10000000000000000"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (-1e21, "-1e+21"),
        (1.2345678901234569e23, "1.2345678901234569e+23"),
        (2.0, "2"),
        (-2.0, "-2"),
        (-0.0, "0"),
        (float("inf"), "Infinity"),  # not from a JSON payload, but never Python's "inf"
        (19.9, "19.9"),
        (42.5, "42.5"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (float(2**60), "1152921504606847000"),
        (12345678901234567890, "12345678901234567890"),  # an int (a webhook's body): every digit
        (-(2**63), "-9223372036854775808"),
        (True, "true"),
    ],
)
def test_numbers_render_as_javascript_writes_them(number: object, text: str) -> None:
    """Values checked against node's Number.prototype.toString. Before, str() wrote
    "1e-07", "1e+16" and "2.0" (a whole number the REST API gives as 2)."""
    ctx = RenderContext(trigger={"order": {"total": number}})
    assert render("total: {{order.total}}", ctx).value == f"total: {text}"
    assert render_config({"total": "{{order.total}}"}, ctx).value == {"total": number}  # one template: the value itself


def test_numbers_from_a_json_body_render_without_losing_precision() -> None:
    import orjson
    from hypothesis import given, settings, strategies as st

    from ipaas.templates import as_text

    payload = orjson.loads(b'{"a": 19.90, "b": 1.10, "c": 2.0, "d": 12345678901234567890, "e": 1E-7}')
    assert render("{{a}} {{b}} {{c}} {{d}} {{e}}", RenderContext(trigger=payload)).value == "19.9 1.1 2 12345678901234567890 1e-7"

    @settings(max_examples=2000, deadline=None, database=None)
    @given(st.floats(allow_nan=False, allow_infinity=False))
    def round_trips(number: float) -> None:
        text = as_text(number)
        assert float(text) == number and float(orjson.loads(text)) == number  # the same double, as JSON too
        assert "e-0" not in text and "e+0" not in text and not text.endswith(".0")

    round_trips()


@pytest.mark.parametrize(
    "template",
    [
        # The audit's: quadratic, and cubic nested (a 1.8 KB payload held an engine for 21 s).
        "{{$..[?count($..*) > 0]}}",
        "{{$..[?count($..[?count($..*) > 0]) > 0]}}",
        "{{$.order.items[?@.qty > $.order.total]}}",  # a query from the root, per item tested
        "{{$.order.items[?@..name]}}",  # descendants of each item tested
        "{{$.order.items[?@.*]}}",  # a node list
        "{{$.order.items[?count(@.*) > 1]}}",
        "{{$.order.items[?count(@..x) == 0]}}",
        "{{$.order.items[?@[?@ == 1]]}}",
        "{{$.order.items[?_.x == 1]}}",  # python-jsonpath's filter context
    ],
)
def test_filters_that_run_a_query_per_item_are_refused(template: str) -> None:
    problems = validate_template(template)
    assert problems and "a filter may only read the item it tests" in problems[0], problems
    with pytest.raises(TemplateError, match="a filter may only read"):  # stored before: fails, does not run
        render(template, CTX)


@pytest.mark.parametrize(
    "template,problem",
    [
        ("{{$.order[$.user.name]}}", "a query inside a selector"),
        ("{{$.order.items & $.order.items}}", "the intersection operator &"),
    ],
)
def test_other_queries_with_a_cost_per_node_are_refused(template: str, problem: str) -> None:
    problems = validate_template(template)
    assert problems and problem in problems[0], problems


@pytest.mark.parametrize(
    "template,expected",
    [
        ("{{$.order.items[?@.qty > 1 && !(@.sku == 'X')].name}}", "Pen"),
        ("{{$.order.items[?@.qty == 1 || @['sku'] == 'P9'].sku}}", '["B1","P9"]'),
        ("{{$.order.items[?@.sku in ['P9', 'Q1']].name}}", "Pen"),
        ("{{$.user[?@ contains 'b']}}", '["a","b"]'),
        ("{{$.order.items[?# == 1].name}}", "Pen"),
        ("{{$.order.items[?count(@.sku) == 1 && value(@.qty) == 3].name}}", "Pen"),
        ("{{$..[?@.qty > 2].sku}}", "P9"),
        ("{{$..sku}}", '["B1","P9"]'),
        ("{{$.order.items[::-1].sku}}", '["P9","B1"]'),
        ("{{$.user.name | $.order.id}}", '["Alex","12345"]'),
    ],
)
def test_filters_on_the_item_itself_still_work(template: str, expected: str) -> None:
    assert validate_template(template) == []
    assert render(template, CTX).value == expected


def _orders(n: int) -> dict:
    return {"orders": [{"id": f"o{i}", "paid": i % 2 == 0, "customer": {"email": f"c{i}@example.com"}, "items": [{"sku": "A", "qty": 1}]} for i in range(n)]}


@pytest.mark.parametrize(
    "config",
    [
        {"text": "{{$..zz}} " * 100},  # the audit's other case: many linear paths that match nothing
        {"text": "{{$.orders[?@.paid == 'never' && @.id == 'x'].id}}"},  # tests every item, makes no node
        {"text": "{{$..*..*..*}}"},
        {"many": ["{{$.orders[0].id}}"] * 3000},  # cheap paths cost something too
    ],
)
def test_templates_that_would_visit_too_much_of_the_payload_fail_the_render(config: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ipaas.templates.MAX_TEMPLATE_WORK", 5_000)
    with pytest.raises(TemplateError, match="templates visit too much of the payload: more than 5000 nodes"):
        render_config(config, RenderContext(trigger=_orders(1000)))


def test_a_large_webhook_with_ordinary_templates_is_far_below_the_work_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """1 MiB of orders: 50 paths by name and index render with a hundredth of the budget,
    and a descendant scan and a filter over every order together with all of it."""
    from ipaas import templates

    payload = _orders(11_000)
    assert len(orjson.dumps(payload)) > 1024 * 1024
    scans = {"emails": "{{$..email}}", "paid": "{{$.orders[?@.paid == true].id}}"}
    rendered = render_config(scans, RenderContext(trigger=payload)).value
    assert (len(rendered["emails"]), len(rendered["paid"]), rendered["paid"][1]) == (11_000, 5_500, "o2")
    monkeypatch.setattr("ipaas.templates.MAX_TEMPLATE_WORK", templates.MAX_TEMPLATE_WORK // 100)
    config = {f"f{i}": f"{{{{$.orders[{i}].customer.email}}}} {{{{orders.{i}.id}}}}" for i in range(50)}
    assert render_config(config, RenderContext(trigger=payload)).value["f49"] == "c49@example.com o49"


@pytest.mark.parametrize(
    "config",
    [
        {"text": "{{$..zz}} " * 5},
        {"text": "{{$.orders[?@.paid == 'never' && @.id == 'x'].id}}"},
        {"many": ["{{$.orders[0].id}}"] * 150},
    ],
)
def test_a_render_past_a_smaller_work_budget_stops_to_be_rendered_again_with_the_full_one(config: dict) -> None:
    """The engine renders on its event loop with INLINE_TEMPLATE_WORK first: running out of
    it is not the step's failure (RenderTooHeavy, not a TemplateError), and the same config
    renders in full with the whole budget."""
    from ipaas.templates import INLINE_TEMPLATE_WORK, RenderTooHeavy

    ctx = RenderContext(trigger=_orders(1000))
    with pytest.raises(RenderTooHeavy):
        render_config(config, ctx, work=INLINE_TEMPLATE_WORK)
    assert not issubclass(RenderTooHeavy, TemplateError)
    assert render_config(config, ctx) == render_config(config, ctx, work=None)


def test_a_cheap_render_is_the_same_within_the_inline_budget() -> None:
    from ipaas.templates import INLINE_TEMPLATE_WORK

    config = {"text": "Hi {{user.name}} {{$.order.items[*].sku}} {{$..city}}", "n": "{{order.total}}"}
    assert render_config(config, CTX, work=INLINE_TEMPLATE_WORK) == render_config(config, CTX)


def test_a_smaller_budget_than_the_whole_never_gives_more_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_TEMPLATE_WORK set below the inline budget: a render past it fails for good, as
    it would with the whole budget (no RenderTooHeavy that would render it again)."""
    from ipaas.templates import INLINE_TEMPLATE_WORK

    monkeypatch.setattr("ipaas.templates.MAX_TEMPLATE_WORK", 50)
    with pytest.raises(TemplateError, match="more than 50 nodes"):
        render_config({"text": "{{$..zz}}"}, RenderContext(trigger=_orders(100)), work=INLINE_TEMPLATE_WORK)


def test_a_descendant_search_does_not_copy_every_ancestors_key_for_each_node() -> None:
    """python-jsonpath keeps a path string per node, every ancestor's key again: long keys
    above a wide list made 200 MB from a 100 KB payload (gigabytes from 1 MiB)."""
    import tracemalloc

    payload: dict = {"bottom": [[0]] * 2000}
    for level in range(20):
        payload = {f"{level}" + "k" * 5000: payload}
    tracemalloc.start()
    try:
        assert render("{{$..*[0]}}", RenderContext(trigger=payload)).value.startswith("[[0],0,0,")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024, peak


def test_a_payload_that_is_a_string_is_not_parsed_again_for_each_jsonpath() -> None:
    # findall parsed a string as JSON, once per template: 1,000 templates over a 1 MiB string
    # parsed a gigabyte. Dotted paths always read a string as a string.
    ctx = RenderContext(trigger='{"a": 1}')
    assert render("{{$.a}}|{{a}}|{{$}}", ctx).value == '||{"a": 1}'
