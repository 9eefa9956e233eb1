"""Generates the metric views from the catalogue (``bus/catalogue.py``): one view per metric, named like the
metric, with the columns ``time``, ``value`` and one text column per label (null where the record has no
value for it), and the union ``metrics_long(time, metric, value, labels jsonb)``. Rows whose value is null
(not measured) are left out. The API and Grafana read metrics through these views only.

The output is committed as a migration (``migrations/NNNN_metric_views.sql``); a test checks the latest
such migration equals what this script renders now. After changing the catalogue:

    python -m consumers.gen_views --write consumers/migrations/NNNN_metric_views.sql   (a new NNNN)

A views migration may begin with hand-written statements its views need (the columns a new metric reads):
everything above the ``GENERATED`` line is kept by ``--write`` and left out of the comparison. The views the
dashboards' readers see are granted by ``aima_reader_grants()`` (migration 0012), which also makes the
per-project views over them: the generated part drops those first and calls it again at its end, since
dropping a view drops its grants.

``--check`` exits 1 when the committed views differ from the catalogue.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from bus import schemas
from bus.catalogue import METRICS, Metric
from consumers.migrate import MIGRATIONS_DIR, discover
from consumers.tables import BY_RECORD, Column, Table

__all__ = ["GENERATED", "VIEW_MARK", "generated_part", "latest_views_migration", "render", "view_source"]

VIEW_MARK = "aima metric view"
"""Every generated view's comment starts with this, so the next generated migration can drop them all."""
_NAME_SUFFIX = "metric_views"
_LONG_COMMENT = f"{VIEW_MARK}s, all metrics: time, metric, value, labels"
# PostgreSQL's reserved key words that could plausibly be label names.
_RESERVED_WORDS = (
    "all analyse analyze and any array as asc both case cast check collate column constraint create "
    "default desc distinct do else end except false fetch for foreign from grant group having in into "
    "lateral leading limit not null offset on only or order placing primary references returning select "
    "some table then to trailing true union unique user using variadic when where window with"
)
_RESERVED = frozenset(_RESERVED_WORDS.split())


def _ident(name: str) -> str:
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name) and name not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


def _as(expression: str, name: str) -> str:
    return expression if expression == _ident(name) else f"{expression} AS {_ident(name)}"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@cache
def _avro_fields(record: str) -> dict[str, Any]:
    """Field path -> Avro type (nullable unions reduced to the non-null branch), items as ``a[].b``."""
    found: dict[str, Any] = {}

    def walk(fields: Iterable[dict[str, Any]], prefix: str) -> None:
        for f in fields:
            kind = f["type"]
            if isinstance(kind, list):
                kind = next(k for k in kind if k != "null")
            found[prefix + f["name"]] = kind
            if isinstance(kind, dict) and kind.get("type") == "array" and isinstance(kind["items"], dict):
                walk(kind["items"].get("fields", ()), f"{prefix}{f['name']}[].")

    walk(schemas.raw(record)["fields"], "")
    return found


def _avro_kind(record: str, path: str) -> str:
    kind = _avro_fields(record)[path]
    if isinstance(kind, dict):
        return "string" if kind.get("type") == "enum" else kind.get("type", "")
    return kind


def view_source(metric: Metric) -> tuple[Table, Column, list[tuple[str, Column]]]:
    """The table holding a metric, its value column, and (label, column) for each label."""
    items = metric.field.rpartition("[].")[0] or None
    candidates = [t for t in BY_RECORD.get(metric.record, ()) if t.items == items]
    if len(candidates) != 1:
        raise LookupError(f"{metric.name}: no single table stores {metric.record} {metric.field}")
    table = candidates[0]
    value = table.column_for(metric.field)
    labels = [(label, table.column_for(metric.label_field(label))) for label in metric.labels]
    return table, value, labels


def _view(metric: Metric) -> str:
    table, value, labels = view_source(metric)
    if _avro_kind(metric.record, value.source) == "boolean":
        value_sql = f"{_ident(value.name)}::integer::double precision"
    else:
        value_sql = f"{_ident(value.name)}::double precision"
    columns = [_as(_ident(table.column_for("time").name), "time"), f"{value_sql} AS value"]
    for label, column in labels:
        expression = _ident(column.name)
        if column.null_as_empty:
            expression = f"NULLIF({expression}, '')"
        elif _avro_kind(metric.record, column.source) != "string":
            expression = f"{expression}::text"
        columns.append(_as(expression, label))
    conditions = [f"{_ident(value.name)} IS NOT NULL"]
    conditions += [f"{_ident(table.column_for(f).name)} = {_literal(v)}" for f, v in metric.where]
    comment = f"{VIEW_MARK} {metric.req_id}: {metric.description} ({metric.unit}, {metric.type})"
    return (
        f"CREATE VIEW {_ident(metric.name)} AS\n"
        f"SELECT {(',' + chr(10) + '       ').join(columns)}\n"
        f"  FROM {_ident(table.name)}\n"
        f" WHERE {(chr(10) + '   AND ').join(conditions)};\n"
        f"COMMENT ON VIEW {_ident(metric.name)} IS {_literal(comment)};\n"
    )


def _long(metrics: Iterable[Metric]) -> str:
    parts = []
    for metric in metrics:
        pairs = ", ".join(f"{_literal(label)}, {_ident(label)}" for label in metric.labels)
        parts.append(
            f"SELECT time, {_literal(metric.name)}::text AS metric, value, "
            f"jsonb_strip_nulls(jsonb_build_object({pairs})) AS labels\n"
            f"  FROM {_ident(metric.name)}"
        )
    return (
        "CREATE VIEW metrics_long AS\n"
        + "\nUNION ALL\n".join(parts)
        + ";\n"
        + f"COMMENT ON VIEW metrics_long IS {_literal(_LONG_COMMENT)};\n"
    )


GENERATED = "-- Generated by consumers/gen_views.py from bus/catalogue.py; do not edit: generate a new one."

_DROP = f"""{GENERATED}
-- Drops the views an earlier generation made (marked by their comment), then creates them anew; first the
-- per-project views over them (schema <schema>_by_project), which aima_reader_grants() below makes again.
DO $$
DECLARE
    v record;
BEGIN
    FOR v IN
        SELECT c.relname
          FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'v' AND n.nspname = current_schema() || '_by_project'
    LOOP
        EXECUTE format('DROP VIEW %I.%I', current_schema() || '_by_project', v.relname);
    END LOOP;
    FOR v IN
        SELECT c.relname
          FROM pg_class c
          JOIN pg_description d ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0
         WHERE c.relkind = 'v' AND c.relnamespace = current_schema()::regnamespace
           AND d.description LIKE '{VIEW_MARK}%'
         ORDER BY c.relname = 'metrics_long' DESC, c.relname
    LOOP
        EXECUTE format('DROP VIEW %I', v.relname);
    END LOOP;
END $$;
"""


_GRANTS = """-- Dropping a view dropped its grants: the dashboards' readers get theirs again (migration 0012).
SELECT aima_reader_grants();
"""


def render(metrics: Iterable[Metric] = METRICS) -> str:
    metrics = tuple(metrics)
    return "\n".join([_DROP, *(_view(m) for m in metrics), _long(metrics), _GRANTS])


def generated_part(text: str) -> str:
    """A views migration's text from its ``GENERATED`` line on (what :func:`render` made)."""
    start = text.find(GENERATED)
    return text[start:] if start >= 0 else text


def latest_views_migration(directory: Path = MIGRATIONS_DIR) -> Path:
    """The newest migration named ``NNNN_..metric_views``: the views the database ends up with."""
    found = [m for m in discover(directory) if m.name.endswith(_NAME_SUFFIX)]
    if not found:
        raise FileNotFoundError(f"no *_{_NAME_SUFFIX}.sql migration in {directory}")
    return found[-1].files[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="PATH", help="write the SQL to PATH")
    group.add_argument("--check", action="store_true", help="exit 1 when the committed views are stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        committed = latest_views_migration()
        if generated_part(committed.read_text()) != text:
            print(f"{committed.name} does not match the catalogue; generate a new migration", file=sys.stderr)
            return 1
        print(f"{committed.name} matches the catalogue")
    elif args.write:
        # The hand-written statements above the generated part stay.
        old = args.write.read_text() if args.write.exists() else ""
        args.write.write_text(old[: len(old) - len(generated_part(old))] + text if GENERATED in old else text)
        print(f"wrote {args.write}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
