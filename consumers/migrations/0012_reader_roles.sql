-- Least privilege for the dashboards (A2, A4, P3): two read-only group roles, NOLOGIN, whose logins
-- (`aima-metrics db grant-reader`) Grafana's datasources use instead of the owner.
--
--   <database>_reader          fleet-wide: SELECT on exactly the tables and views the admin, finance and
--                              users dashboards read (never api_tokens, audit_log, silences, dead letters,
--                              the notification log or schema_migrations).
--   <database>_project_reader  per project: SELECT on schema <schema>_by_project, views with the names of
--                              the users dashboard's project tables and views that keep only the rows of the
--                              projects its reader_projects lists for current_user, plus the fleet's GPU and host
--                              relations, which carry no project. The login's search_path puts
--                              <schema>_by_project first, so the users dashboard's SQL runs unchanged.
--
-- Roles are cluster-wide, so they are named after the database, created when missing and granted per
-- schema: every schema of one database (each test's own) shares them, and DROP SCHEMA takes the grants
-- along. Views rather than row-level security: TimescaleDB refuses RLS on compressed hypertables, and its
-- chunks would not inherit the policies. The views are security barriers, so a reader's own (leaky)
-- function cannot see rows before the project filter. Creating the roles needs CREATEROLE (or a superuser)
-- unless an administrator made them first.

DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY[left(current_database(), 40) || '_reader',
                                     left(current_database(), 40) || '_project_reader'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
            EXCEPTION
                -- Another database's migration created it meanwhile.
                WHEN duplicate_object OR unique_violation THEN NULL;
                WHEN insufficient_privilege THEN
                    RAISE EXCEPTION 'role % is missing and % may not create it', role_name, current_user
                        USING HINT = format('ALTER ROLE %I CREATEROLE, or have a superuser run: CREATE ROLE %I NOLOGIN',
                                            current_user, role_name);
            END;
        END IF;
    END LOOP;
END $$;

-- Which projects each project-reader login may see; written by `aima-metrics db grant-reader`. Beside the
-- views that read it, in <schema>_by_project: readers have no grant on it.
DO $$
BEGIN
    EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', current_schema() || '_by_project');
    EXECUTE format('CREATE TABLE %I.reader_projects (
                        login   text NOT NULL,
                        project text NOT NULL,
                        PRIMARY KEY (login, project))', current_schema() || '_by_project');
END $$;

CREATE FUNCTION aima_reader_role(kind text) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT left(current_database(), 40) || CASE kind WHEN 'fleet' THEN '_reader'
                                                     WHEN 'project' THEN '_project_reader' END
$$;

-- (Re)applies every reader grant and the per-project views of the current schema; a migration that
-- re-creates a view the dashboards read calls it again (dropping a view drops its grants).
-- What each reader group may SELECT, one row per relation; a migration that adds a relation a dashboard
-- reads inserts its row and calls aima_reader_grants() (tests/integration/test_reader_access.py keeps the
-- fleet rows equal to what the dashboards read). grant: 'fleet' (the fleet reader), 'shared' (the project
-- reader too, as it is: no project data), 'by_project' (the project reader through a view of its rows).
CREATE TABLE reader_relations (
    relation text PRIMARY KEY,
    fleet    boolean NOT NULL DEFAULT true,
    shared   boolean NOT NULL DEFAULT false,
    by_project boolean NOT NULL DEFAULT false
);
INSERT INTO reader_relations (relation) SELECT unnest(ARRAY[
    'alert_history', 'anomalies', 'costs', 'rollups', 'gpu_samples', 'system_samples', 'job_events',
    'job_timings', 'budgets', 'budget_forecast_eur', 'budget_utilization_percent', 'cost_estimated_eur',
    'cuda_kernel_duration_seconds', 'gpu_ecc_corrected_errors', 'gpu_ecc_uncorrected_errors',
    'gpu_energy_joules', 'gpu_hours', 'gpu_idle_hours', 'gpu_memory_bandwidth_utilization_percent',
    'gpu_memory_clock_hz', 'gpu_memory_used_bytes', 'gpu_memory_utilization_percent',
    'gpu_pcie_rx_bytes_per_second', 'gpu_pcie_tx_bytes_per_second', 'gpu_power_watts', 'gpu_sm_clock_hz',
    'gpu_temperature_celsius', 'gpu_tensor_core_utilization_percent', 'gpu_utilization_percent',
    'host_containers_running', 'host_cpu_utilization_percent', 'host_disk_used_bytes',
    'host_memory_used_bytes', 'host_network_receive_bytes_per_second',
    'host_network_transmit_bytes_per_second', 'job_batch_processing_seconds', 'job_cost_eur',
    'job_cost_per_media_minute_eur', 'job_data_transfer_bytes', 'job_data_transfer_seconds',
    'job_frame_processing_seconds', 'job_inference_seconds', 'job_model_load_seconds',
    'job_queue_wait_seconds', 'k8s_pod_restarts', 'k8s_pod_status', 'queue_length_jobs']);
-- Fleet relations without project data that the users dashboard reads as they are.
UPDATE reader_relations SET shared = true WHERE relation IN (
    'system_samples', 'gpu_utilization_percent', 'gpu_temperature_celsius', 'gpu_sm_clock_hz',
    'host_cpu_utilization_percent', 'gpu_pcie_rx_bytes_per_second');
-- The users dashboard's project relations, filtered by their project column.
UPDATE reader_relations SET by_project = true WHERE relation IN (
    'job_events', 'job_timings', 'costs', 'cost_estimated_eur', 'job_cost_eur',
    'job_cost_per_media_minute_eur', 'job_queue_wait_seconds', 'job_frame_processing_seconds',
    'job_inference_seconds', 'job_batch_processing_seconds', 'job_data_transfer_bytes',
    'job_data_transfer_seconds', 'job_model_load_seconds');

-- (Re)applies every reader grant and the per-project views of the current schema, from reader_relations;
-- a migration that re-creates a view the dashboards read calls it again (dropping a view drops its grants).
CREATE FUNCTION aima_reader_grants() RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    s       text := current_schema();
    mine    text := current_schema() || '_by_project';
    fleet   text := aima_reader_role('fleet');
    project text := aima_reader_role('project');
    r       record;
    rel     text;
    visible text := format('(SELECT r.project FROM %I.reader_projects r WHERE r.login = current_user)', mine);
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I, %I', s, fleet, project);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', mine, project);
    FOR r IN SELECT * FROM reader_relations ORDER BY relation LOOP
        IF r.fleet THEN
            EXECUTE format('GRANT SELECT ON %I.%I TO %I', s, r.relation, fleet);
        END IF;
        IF r.shared THEN
            EXECUTE format('GRANT SELECT ON %I.%I TO %I', s, r.relation, project);
        END IF;
        IF r.by_project THEN
            EXECUTE format('CREATE OR REPLACE VIEW %I.%I WITH (security_barrier) AS '
                           'SELECT * FROM %I.%I WHERE project IN %s', mine, r.relation, s, r.relation, visible);
            EXECUTE format('GRANT SELECT ON %I.%I TO %I', mine, r.relation, project);
        END IF;
    END LOOP;
    -- gpu_samples without its process list (pids and names of every project's processes): a view of the
    -- other columns. Not a column grant on the table: TimescaleDB hands a hypertable's grants on to its
    -- compressed hypertable, which has no such columns, and the GRANT fails (2.28.3: column "time" of
    -- relation "_compressed_hypertable_N" does not exist).
    EXECUTE format('CREATE OR REPLACE VIEW %I.gpu_samples WITH (security_barrier) AS '
                   'SELECT time, host, gpu, gpu_uuid, gpu_model, mig_instance, throttle_reasons '
                   'FROM %I.gpu_samples', mine, s);
    -- Kernel timings carry the job only: the jobs of the visible projects.
    EXECUTE format('CREATE OR REPLACE VIEW %I.cuda_kernel_duration_seconds WITH (security_barrier) AS '
                   'SELECT * FROM %I.cuda_kernel_duration_seconds WHERE job_id IN '
                   '(SELECT t.job_id FROM %I.job_timings t WHERE t.project IN %s)', mine, s, s, visible);
    -- Alerts of the visible projects and those of no project (a hot GPU, a queue backlog).
    EXECUTE format('CREATE OR REPLACE VIEW %I.alert_history WITH (security_barrier) AS '
                   'SELECT * FROM %I.alert_history WHERE labels->>''project'' IS NULL '
                   'OR labels->>''project'' IN %s', mine, s, visible);
    FOR rel IN SELECT unnest(ARRAY['gpu_samples', 'cuda_kernel_duration_seconds', 'alert_history']) LOOP
        EXECUTE format('GRANT SELECT ON %I.%I TO %I', mine, rel, project);
    END LOOP;
END
$fn$;

SELECT aima_reader_grants();
