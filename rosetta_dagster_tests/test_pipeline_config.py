"""Loading rosetta.yaml: validation errors are one sentence naming file, entry and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from rosetta_dagster.core.pipeline_config import (
    PipelineConfigError,
    PipelineFile,
    TableRef,
    load_config,
)

VALID = """
sources:
  shop: {host: 127.0.0.1, port: 5432, database: shop, user: rep, password: "${SHOP_PW}"}
destinations:
  wh: {host: 127.0.0.1, port: 5433, database: wh, user: ros, password: "${WH_PW}", schema: copy}
pipelines:
  orders:
    source: shop
    destinations: [wh]
    tables: [public.orders, sales.customers]
    streaming: {max_batch_size: 1024, jvm_max_heap: 256m}
"""
ENV = {"SHOP_PW": "shop-secret", "WH_PW": "wh-secret"}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rosetta.yaml"
    path.write_text(text)
    return path


def test_valid_file_resolves_secrets_from_the_environment(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, VALID), ENV)
    pipeline = config.pipeline("orders")
    assert pipeline.tables == (TableRef("public", "orders"), TableRef("sales", "customers"))
    assert pipeline.source.password == "shop-secret"
    assert pipeline.destinations[0].schema == "copy"
    assert pipeline.settings.max_batch_size == 1024 and pipeline.settings.jvm_max_heap == "256m"
    assert pipeline.settings.initial_load == "copy"  # the default
    assert pipeline.slot_name == pipeline.publication_name == "rosetta_orders"
    assert "shop-secret" not in repr(pipeline)
    unresolved = load_config(_write(tmp_path, VALID), {}, resolve_secrets=False)
    assert unresolved.pipeline("orders").source.password is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("source: shop", "source: nope"),
         "pipeline 'orders' field 'source' names the unknown source 'nope'."),
        (("destinations: [wh]", "destinations: [wh, lake]"),
         "pipeline 'orders' field 'destinations' names the unknown destination 'lake'."),
        (("public.orders", "orders"),
         "pipeline 'orders' field 'tables' has 'orders', which is not a schema.table name."),
        (('"${SHOP_PW}"', "hunter2"),
         "source 'shop' field 'password' must be an ${ENV_VAR} reference, not a literal secret."),
        (('"${SHOP_PW}"', '"${MISSING_PW}"'),
         "source 'shop' field 'password' refers to the environment variable MISSING_PW, "
         "which is not set."),
        (("  orders:\n", "  orders:\n    source: shop\n    destinations: [wh]\n    tables: [a.b]\n"
                         "  orders:\n"),
         "'orders' is declared twice (line"),
        (("max_batch_size: 1024", "max_batch_size: lots"),
         "pipeline 'orders' streaming field 'max_batch_size' must be an integer >= 1."),
        (("max_batch_size: 1024", "initial_load: rsync"),
         "pipeline 'orders' streaming field 'initial_load' must be one of copy, debezium."),
        (("max_batch_size: 1024", "initial_load_workers: 0"),
         "pipeline 'orders' streaming field 'initial_load_workers' must be an integer >= 1."),
        (("max_batch_size: 1024", "on_apply_error: ignore"),
         "pipeline 'orders' streaming field 'on_apply_error' must be one of stop, park."),
        (("max_batch_size: 1024", "apply_retry_seconds: -1"),
         "pipeline 'orders' streaming field 'apply_retry_seconds' must be an integer >= 0."),
        (("max_batch_size: 1024", "offset_stor: config_db"),
         "pipeline 'orders' streaming field 'offset_stor' is not a known setting."),
        (("max_batch_size: 1024", "offset_store: s3"),
         "pipeline 'orders' streaming field 'offset_store' must be one of file, config_db."),
        (("max_batch_size: 1024", "offset_store: config_db, engine: pgoutput"),
         "pipeline 'orders' streaming field 'offset_store' applies to the debezium engine only "
         "(pgoutput keeps its positions in the destinations)."),
    ],
    ids=["unknown_source", "unknown_destination", "bad_table", "literal_password",
         "missing_env_var", "duplicate_pipeline", "bad_setting", "bad_load_method",
         "bad_load_workers", "bad_apply_error_policy", "bad_apply_retry", "misspelt_setting",
         "bad_offset_store", "offset_store_with_pgoutput"],
)
def test_invalid_files_fail_with_one_clear_sentence(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    path = _write(tmp_path, VALID.replace(*change))
    with pytest.raises(PipelineConfigError) as raised:
        load_config(path, ENV)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "hunter2" not in message and "shop-secret" not in message


def test_missing_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(PipelineConfigError, match="file not found .set ROSETTA_CONFIG"):
        load_config(tmp_path / "absent.yaml", ENV)


OPTIONS = """
sources:
  shop: {host: 127.0.0.1, port: 5432, database: shop, user: rep, password: "${SHOP_PW}"}
destinations:
  wh: {host: 127.0.0.1, port: 5433, database: wh, user: ros, password: "${WH_PW}", schema: copy}
  lake: {host: 127.0.0.1, port: 5434, database: lake, user: ros, password: "${WH_PW}"}
pipelines:
  orders:
    source: shop
    destinations: [wh, lake]
    tables:
      - public.customers
      - name: public.orders
        columns: [id, total, status]
        where: "status <> 'draft' AND note = 'a;b' AND x = 'it''s'"
        target: sales.orders_eu
      - name: public.items
        exclude_columns: [secret]
        target: {wh: items_copy, lake: raw.items}
        replicate: inserts_only
"""


def test_table_options_are_read_with_their_targets_per_destination(tmp_path: Path) -> None:
    pipeline = load_config(_write(tmp_path, OPTIONS), ENV).pipeline("orders")
    customers, orders, items = pipeline.tables
    wh, lake = pipeline.destinations
    assert pipeline.options(orders).columns == ("id", "total", "status")
    assert pipeline.options(orders).where == "status <> 'draft' AND note = 'a;b' AND x = 'it''s'"
    assert pipeline.options(items).exclude_columns == ("secret",)
    assert not pipeline.options(customers).filters_rows_or_columns
    assert pipeline.options(items).inserts_only and not pipeline.options(orders).inserts_only
    assert pipeline.publication_names == "rosetta_orders,rosetta_orders_inserts"
    assert [pipeline.target(t, d).qualified for t in (customers, orders, items)
            for d in (wh, lake)] == ["copy.customers", "public.customers", "sales.orders_eu",
                                     "sales.orders_eu", "copy.items_copy", "raw.items"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("columns: [id, total, status]", "columns: [id, total]\n        exclude_columns: [note]"),
         "table 'public.orders' field 'exclude_columns' cannot be combined with columns"),
        (("columns: [id, total, status]", "filter: x"),
         "table 'public.orders' field 'filter' is not a table option (use columns, "
         "exclude_columns, name, replicate, target, where)."),
        (("columns: [id, total, status]", "replicate: updates_only"),
         "table 'public.orders' field 'replicate' must be one of all, inserts_only."),
        (("columns: [id, total, status]", "columns: []"),
         "table 'public.orders' field 'columns' must be a non-empty list of column names."),
        (("AND x = 'it''s'", "); DROP TABLE x; --"),
         "table 'public.orders' field 'where' must be one boolean expression (a ')' without its "
         "'(')."),
        (("AND x = 'it''s'", "OR true; DELETE FROM y"),
         "field 'where' must be one boolean expression (';' outside a string literal)."),
        (("target: sales.orders_eu", "target: {pond: x}"),
         "table 'public.orders' field 'target' names 'pond', which is not a destination of the "
         "pipeline."),
        (("target: sales.orders_eu", "target: a.b.c"),
         "field 'target' has 'a.b.c', which is not a table or schema.table name."),
        (("target: {wh: items_copy, lake: raw.items}", "target: sales.orders_eu"),
         "pipeline 'orders' writes public.orders and public.items to sales.orders_eu in "
         "destination 'wh'; give one of them another target or destination schema."),
        (("destinations: [wh, lake]", "destinations: [wh, lake]\n    streaming: "
                                      "{initial_load: debezium}"),
         "pipeline 'orders' streaming field 'initial_load' must be copy when a table has "
         "columns, exclude_columns or where."),
    ],
    ids=["columns_and_exclude", "unknown_option", "bad_replicate", "empty_columns",
         "where_escapes_parentheses",
         "where_two_statements", "target_unknown_destination", "target_bad_name",
         "duplicate_targets", "debezium_snapshot_with_options"],
)
def test_bad_table_options_fail_with_one_clear_sentence(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    assert change[0] in OPTIONS
    path = _write(tmp_path, OPTIONS.replace(*change))
    with pytest.raises(PipelineConfigError) as raised:
        load_config(path, ENV)
    assert expected in str(raised.value)


def test_destination_assets_and_check_specs_are_the_target_tables(tmp_path: Path) -> None:
    from dagster import AssetKey

    from rosetta_dagster.defs.naming import AssetNaming
    from rosetta_dagster.defs.pipelines.assets import pipeline_asset_specs
    from rosetta_dagster.defs.pipelines.checks import build_pipeline_checks

    path = _write(tmp_path, OPTIONS)
    pipeline = load_config(path, ENV).pipeline("orders")
    keys = {spec.key for spec in pipeline_asset_specs(pipeline, AssetNaming())}
    assert {AssetKey(["destination", "wh", "sales", "orders_eu"]),
            AssetKey(["destination", "lake", "raw", "items"]),
            AssetKey(["destination", "lake", "public", "customers"])} <= keys
    assert AssetKey(["destination", "wh", "copy", "orders"]) not in keys
    (checks,) = build_pipeline_checks(pipeline, PipelineFile(path))
    assert {key.asset_key for key in checks.check_keys} <= keys


def test_the_poll_interval_is_longer_on_a_host_of_many_debezium_pipelines(
        tmp_path: Path) -> None:
    """Unset, ``poll_interval_ms`` is 20 ms, or 50 ms in a configuration of more than ten
    Debezium pipelines (their idle polling; docs/benchmarks.md); set, it is kept. pgoutput
    pipelines do not count."""
    def config(debezium: int, pgoutput: int = 0) -> dict[str, int]:
        entries = [f"  d{i}: {{source: shop, destinations: [wh], tables: [public.t{i}]}}"
                   for i in range(debezium)]
        entries += [f"  p{i}: {{source: shop, destinations: [wh], tables: [public.u{i}], "
                    "streaming: {engine: pgoutput}}" for i in range(pgoutput)]
        entries.append("  fixed: {source: shop, destinations: [wh], tables: [public.x], "
                       "streaming: {engine: pgoutput, poll_interval_ms: 35}}")
        text = VALID.split("pipelines:")[0] + "pipelines:\n" + "\n".join(entries) + "\n"
        loaded = load_config(_write(tmp_path, text), ENV)
        return {name: p.settings.poll_interval_ms for name, p in loaded.pipelines.items()}

    assert set(config(10, pgoutput=5).values()) == {20, 35}
    many = config(11)
    assert {many[f"d{i}"] for i in range(11)} == {50} and many["fixed"] == 35
