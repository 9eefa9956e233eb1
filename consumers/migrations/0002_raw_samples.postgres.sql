-- Plain PostgreSQL: every raw table becomes range-partitioned by day (UTC) on its time column, with
-- partitions created ahead of time by aima_ensure_partitions() and a DEFAULT partition that takes
-- whatever falls outside them, so no row is ever rejected. Retention drops whole expired partitions
-- (consumers/retention.py).

-- Re-creates an (empty) table as a partitioned one with the same columns, constraints, comments and
-- indexes (index names kept), plus its DEFAULT partition <table>_default.
CREATE FUNCTION aima_partition_by_day(p_table text, p_column text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    old_name text := p_table || '_unpartitioned';
    definitions text[];
    definition text;
BEGIN
    EXECUTE format('ALTER TABLE %I RENAME TO %I', p_table, old_name);
    SELECT coalesce(array_agg(pg_get_indexdef(i.indexrelid) ORDER BY i.indexrelid), '{}')
      INTO definitions
      FROM pg_index i
     WHERE i.indrelid = format('%I.%I', current_schema(), old_name)::regclass;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING ALL EXCLUDING INDEXES) PARTITION BY RANGE (%I)',
                   p_table, old_name, p_column);
    EXECUTE format('DROP TABLE %I', old_name);
    FOREACH definition IN ARRAY definitions LOOP
        EXECUTE regexp_replace(definition, ' ON (\S+\.)?' || old_name || ' USING ',
                               ' ON ' || quote_ident(p_table) || ' USING ');
    END LOOP;
    EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT', p_table || '_default', p_table);
END $$;

-- Creates the daily partitions <table>_pYYYYMMDD from p_days_back days before p_now to p_days_ahead days
-- after it (UTC days) for every partitioned table in retention_policies, except days already expired
-- by that table's retention; rows already in the DEFAULT
-- partition for such a day move into the new partition. Returns how many partitions it created.
-- Called by the migrations, periodically by the sink, and by retention.
CREATE FUNCTION aima_ensure_partitions(
    p_now timestamptz DEFAULT now(), p_days_back integer DEFAULT 2, p_days_ahead integer DEFAULT 7
) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    t record;
    today date := (p_now AT TIME ZONE 'UTC')::date;
    day date;
    lower_bound timestamptz;
    upper_bound timestamptz;
    part text;
    default_part text;
    has_rows boolean;
    created integer := 0;
BEGIN
    -- Sinks, retention and migrations may call this at the same time.
    PERFORM pg_advisory_xact_lock(hashtext('aima_ensure_partitions:' || current_schema()));
    FOR t IN
        SELECT p.relation, p.time_column, c.oid AS parent,
               CASE WHEN bool_or(p.keep IS NULL) THEN NULL ELSE max(p.keep) END AS keep
          FROM retention_policies p
          JOIN pg_class c ON c.relname = p.relation AND c.relnamespace = current_schema()::regnamespace
          JOIN pg_partitioned_table pt ON pt.partrelid = c.oid
         GROUP BY p.relation, p.time_column, c.oid
    LOOP
        SELECT d.relname INTO default_part
          FROM pg_inherits i JOIN pg_class d ON d.oid = i.inhrelid
         WHERE i.inhparent = t.parent AND pg_get_expr(d.relpartbound, d.oid) = 'DEFAULT';
        FOR offset_days IN -p_days_back .. p_days_ahead LOOP
            day := today + offset_days;
            part := t.relation || '_p' || to_char(day, 'YYYYMMDD');
            CONTINUE WHEN to_regclass(format('%I.%I', current_schema(), part)) IS NOT NULL;
            lower_bound := day::timestamp AT TIME ZONE 'UTC';
            upper_bound := (day + 1)::timestamp AT TIME ZONE 'UTC';
            -- A day retention would drop at once is not created (its late rows wait in DEFAULT).
            CONTINUE WHEN t.keep IS NOT NULL AND upper_bound <= p_now - t.keep;
            has_rows := false;
            IF default_part IS NOT NULL THEN
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE %I >= $1 AND %I < $2)',
                               default_part, t.time_column, t.time_column)
                   INTO has_rows USING lower_bound, upper_bound;
            END IF;
            IF has_rows THEN
                EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                               part, t.relation);
                EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I >= $1 AND %I < $2 RETURNING *) '
                               'INSERT INTO %I SELECT * FROM moved',
                               default_part, t.time_column, t.time_column, part)
                   USING lower_bound, upper_bound;
                EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                               t.relation, part, lower_bound, upper_bound);
            ELSE
                EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                               part, t.relation, lower_bound, upper_bound);
            END IF;
            created := created + 1;
        END LOOP;
    END LOOP;
    RETURN created;
END $$;

DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT DISTINCT relation, time_column FROM retention_policies ORDER BY relation LOOP
        PERFORM aima_partition_by_day(t.relation, t.time_column);
        -- Samples arrive roughly in time order: a BRIN index serves time-range scans at little cost.
        EXECUTE format('CREATE INDEX %I ON %I USING brin (%I)', t.relation || '_time', t.relation, t.time_column);
    END LOOP;
END $$;

SELECT aima_ensure_partitions();
