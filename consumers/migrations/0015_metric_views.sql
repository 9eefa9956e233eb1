-- Pod CPU and memory from the Kubernetes Metrics Server (seed §3.2), beside pod status (M21): PodStatus's
-- optional fields cpu_usage_cores and memory_usage_bytes get their columns, the catalogue's
-- k8s_pod_cpu_usage_cores and k8s_pod_memory_usage_bytes their views (generated below), and the fleet
-- reader of the admin dashboard, which draws them, its grant: migration 0012's aima_reader_grants() with
-- the two views added to the relations the dashboards read (the rest as there).
ALTER TABLE pod_status
    ADD COLUMN cpu_usage_cores    double precision,
    ADD COLUMN memory_usage_bytes bigint;

CREATE OR REPLACE FUNCTION aima_reader_grants() RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    s       text := current_schema();
    mine    text := current_schema() || '_by_project';
    fleet   text := aima_reader_role('fleet');
    project text := aima_reader_role('project');
    rel     text;
    -- Every relation the dashboards read (tests/integration/test_reader_access.py keeps this in step).
    fleet_relations text[] := ARRAY[
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
        'job_queue_wait_seconds', 'k8s_pod_restarts', 'k8s_pod_status', 'queue_length_jobs',
        'k8s_pod_cpu_usage_cores', 'k8s_pod_memory_usage_bytes'];
    -- Fleet relations without project data that the users dashboard reads as they are.
    shared_relations text[] := ARRAY[
        'system_samples', 'gpu_utilization_percent', 'gpu_temperature_celsius', 'gpu_sm_clock_hz',
        'host_cpu_utilization_percent', 'gpu_pcie_rx_bytes_per_second'];
    -- The users dashboard's project relations, filtered by their project column.
    by_project text[] := ARRAY[
        'job_events', 'job_timings', 'costs', 'cost_estimated_eur', 'job_cost_eur',
        'job_cost_per_media_minute_eur', 'job_queue_wait_seconds', 'job_frame_processing_seconds',
        'job_inference_seconds', 'job_batch_processing_seconds', 'job_data_transfer_bytes',
        'job_data_transfer_seconds', 'job_model_load_seconds'];
    visible text := format('(SELECT r.project FROM %I.reader_projects r WHERE r.login = current_user)', mine);
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I, %I', s, fleet, project);
    FOREACH rel IN ARRAY fleet_relations LOOP
        EXECUTE format('GRANT SELECT ON %I.%I TO %I', s, rel, fleet);
    END LOOP;
    FOREACH rel IN ARRAY shared_relations LOOP
        EXECUTE format('GRANT SELECT ON %I.%I TO %I', s, rel, project);
    END LOOP;
    -- gpu_samples without its process list (pids and names of every project's processes).
    EXECUTE format('GRANT SELECT (time, host, gpu, gpu_uuid, gpu_model, mig_instance, throttle_reasons) '
                   'ON %I.gpu_samples TO %I', s, project);

    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', mine, project);
    FOREACH rel IN ARRAY by_project LOOP
        EXECUTE format('CREATE OR REPLACE VIEW %I.%I WITH (security_barrier) AS '
                       'SELECT * FROM %I.%I WHERE project IN %s', mine, rel, s, rel, visible);
        EXECUTE format('GRANT SELECT ON %I.%I TO %I', mine, rel, project);
    END LOOP;
    -- Kernel timings carry the job only: the jobs of the visible projects.
    EXECUTE format('CREATE OR REPLACE VIEW %I.cuda_kernel_duration_seconds WITH (security_barrier) AS '
                   'SELECT * FROM %I.cuda_kernel_duration_seconds WHERE job_id IN '
                   '(SELECT t.job_id FROM %I.job_timings t WHERE t.project IN %s)', mine, s, s, visible);
    -- Alerts of the visible projects and those of no project (a hot GPU, a queue backlog).
    EXECUTE format('CREATE OR REPLACE VIEW %I.alert_history WITH (security_barrier) AS '
                   'SELECT * FROM %I.alert_history WHERE labels->>''project'' IS NULL '
                   'OR labels->>''project'' IN %s', mine, s, visible);
    FOR rel IN SELECT unnest(ARRAY['cuda_kernel_duration_seconds', 'alert_history']) LOOP
        EXECUTE format('GRANT SELECT ON %I.%I TO %I', mine, rel, project);
    END LOOP;
END
$fn$;

-- Generated by consumers/gen_views.py from bus/catalogue.py; do not edit: generate a new one.
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
           AND d.description LIKE 'aima metric view%'
         ORDER BY c.relname = 'metrics_long' DESC, c.relname
    LOOP
        EXECUTE format('DROP VIEW %I', v.relname);
    END LOOP;
END $$;

CREATE VIEW gpu_utilization_percent AS
SELECT time,
       utilization_percent::double precision AS value,
       host,
       gpu::text AS gpu,
       gpu_uuid,
       gpu_model,
       NULLIF(mig_instance, '') AS mig_instance
  FROM gpu_samples
 WHERE utilization_percent IS NOT NULL;
COMMENT ON VIEW gpu_utilization_percent IS 'aima metric view M1: Time a kernel was running (%, gauge)';

CREATE VIEW gpu_memory_used_bytes AS
SELECT time,
       memory_used_bytes::double precision AS value,
       host,
       gpu::text AS gpu,
       gpu_uuid,
       gpu_model,
       NULLIF(mig_instance, '') AS mig_instance
  FROM gpu_samples
 WHERE memory_used_bytes IS NOT NULL;
COMMENT ON VIEW gpu_memory_used_bytes IS 'aima metric view M2: Framebuffer memory in use (bytes, gauge)';

CREATE VIEW gpu_memory_utilization_percent AS
SELECT time,
       memory_utilization_percent::double precision AS value,
       host,
       gpu::text AS gpu,
       gpu_uuid,
       gpu_model,
       NULLIF(mig_instance, '') AS mig_instance
  FROM gpu_samples
 WHERE memory_utilization_percent IS NOT NULL;
COMMENT ON VIEW gpu_memory_utilization_percent IS 'aima metric view M3: Memory in use as a share of capacity (used / total) (%, gauge)';

CREATE VIEW gpu_memory_bandwidth_utilization_percent AS
SELECT time,
       memory_bandwidth_utilization_percent::double precision AS value,
       host,
       gpu::text AS gpu,
       gpu_uuid,
       gpu_model,
       NULLIF(mig_instance, '') AS mig_instance
  FROM gpu_samples
 WHERE memory_bandwidth_utilization_percent IS NOT NULL;
COMMENT ON VIEW gpu_memory_bandwidth_utilization_percent IS 'aima metric view M3: Time the memory controller was busy (NVML utilization.memory) (%, gauge)';

CREATE VIEW gpu_temperature_celsius AS
SELECT time,
       temperature_celsius::double precision AS value,
       host,
       gpu::text AS gpu,
       gpu_uuid,
       gpu_model,
       NULLIF(mig_instance, '') AS mig_instance
  FROM gpu_samples
 WHERE temperature_celsius IS NOT NULL;
COMMENT ON VIEW gpu_temperature_celsius IS 'aima metric view M4: GPU core temperature (°C, gauge)';

CREATE VIEW gpu_power_watts AS
SELECT time,
       power_watts::double precision AS value,
       host,
       gpu::text AS gpu,
       gpu_uuid,
       gpu_model,
       NULLIF(mig_instance, '') AS mig_instance
  FROM gpu_samples
 WHERE power_watts IS NOT NULL;
COMMENT ON VIEW gpu_power_watts IS 'aima metric view M5: Board power draw (W, gauge)';

CREATE VIEW gpu_tensor_core_utilization_percent AS
SELECT time,
       tensor_core_utilization_percent::double precision AS value,
       host,
       gpu::text AS gpu,
       gpu_uuid,
       gpu_model,
       NULLIF(mig_instance, '') AS mig_instance
  FROM gpu_samples
 WHERE tensor_core_utilization_percent IS NOT NULL;
COMMENT ON VIEW gpu_tensor_core_utilization_percent IS 'aima metric view M7: Tensor pipe activity (NVML GPM, Hopper and newer; absent elsewhere) (%, gauge)';

CREATE VIEW gpu_pcie_tx_bytes_per_second AS
SELECT time,
       pcie_tx_bytes_per_second::double precision AS value,
       host,
       gpu::text AS gpu,
       gpu_uuid,
       gpu_model,
       NULLIF(mig_instance, '') AS mig_instance
  FROM gpu_samples
 WHERE pcie_tx_bytes_per_second IS NOT NULL;
COMMENT ON VIEW gpu_pcie_tx_bytes_per_second IS 'aima metric view M8: PCIe GPU to host (B/s, gauge)';

CREATE VIEW gpu_pcie_rx_bytes_per_second AS
SELECT time,
       pcie_rx_bytes_per_second::double precision AS value,
       host,
       gpu::text AS gpu,
       gpu_uuid,
       gpu_model,
       NULLIF(mig_instance, '') AS mig_instance
  FROM gpu_samples
 WHERE pcie_rx_bytes_per_second IS NOT NULL;
COMMENT ON VIEW gpu_pcie_rx_bytes_per_second IS 'aima metric view M8: PCIe host to GPU (B/s, gauge)';

CREATE VIEW gpu_energy_joules AS
SELECT time,
       energy_joules::double precision AS value,
       host,
       gpu::text AS gpu,
       gpu_uuid,
       gpu_model,
       NULLIF(mig_instance, '') AS mig_instance
  FROM gpu_samples
 WHERE energy_joules IS NOT NULL;
COMMENT ON VIEW gpu_energy_joules IS 'aima metric view extra: Energy since driver load (J, counter)';

CREATE VIEW gpu_sm_clock_hz AS
SELECT time,
       sm_clock_hz::double precision AS value,
       host,
       gpu::text AS gpu,
       gpu_uuid,
       gpu_model,
       NULLIF(mig_instance, '') AS mig_instance
  FROM gpu_samples
 WHERE sm_clock_hz IS NOT NULL;
COMMENT ON VIEW gpu_sm_clock_hz IS 'aima metric view extra: Streaming-multiprocessor clock (Hz, gauge)';

CREATE VIEW gpu_memory_clock_hz AS
SELECT time,
       memory_clock_hz::double precision AS value,
       host,
       gpu::text AS gpu,
       gpu_uuid,
       gpu_model,
       NULLIF(mig_instance, '') AS mig_instance
  FROM gpu_samples
 WHERE memory_clock_hz IS NOT NULL;
COMMENT ON VIEW gpu_memory_clock_hz IS 'aima metric view extra: Memory clock (Hz, gauge)';

CREATE VIEW gpu_ecc_corrected_errors AS
SELECT time,
       ecc_corrected_errors::double precision AS value,
       host,
       gpu::text AS gpu,
       gpu_uuid,
       gpu_model,
       NULLIF(mig_instance, '') AS mig_instance
  FROM gpu_samples
 WHERE ecc_corrected_errors IS NOT NULL;
COMMENT ON VIEW gpu_ecc_corrected_errors IS 'aima metric view extra: Corrected ECC errors since driver load (count, counter)';

CREATE VIEW gpu_ecc_uncorrected_errors AS
SELECT time,
       ecc_uncorrected_errors::double precision AS value,
       host,
       gpu::text AS gpu,
       gpu_uuid,
       gpu_model,
       NULLIF(mig_instance, '') AS mig_instance
  FROM gpu_samples
 WHERE ecc_uncorrected_errors IS NOT NULL;
COMMENT ON VIEW gpu_ecc_uncorrected_errors IS 'aima metric view extra: Uncorrected ECC errors since driver load (count, counter)';

CREATE VIEW cuda_kernel_duration_seconds AS
SELECT time,
       sum_seconds::double precision AS value,
       job_id,
       NULLIF(kernel, '') AS kernel
  FROM job_timings
 WHERE sum_seconds IS NOT NULL
   AND kind = 'cuda_kernel';
COMMENT ON VIEW cuda_kernel_duration_seconds IS 'aima metric view M6: CUDA kernel run time (s, summary)';

CREATE VIEW job_frame_processing_seconds AS
SELECT time,
       sum_seconds::double precision AS value,
       job_id,
       project,
       model
  FROM job_timings
 WHERE sum_seconds IS NOT NULL
   AND kind = 'frame';
COMMENT ON VIEW job_frame_processing_seconds IS 'aima metric view M9: Time to process one frame (s, summary)';

CREATE VIEW job_inference_seconds AS
SELECT time,
       sum_seconds::double precision AS value,
       job_id,
       project,
       model
  FROM job_timings
 WHERE sum_seconds IS NOT NULL
   AND kind = 'inference';
COMMENT ON VIEW job_inference_seconds IS 'aima metric view M10: Inference time, mean per step (s, summary)';

CREATE VIEW job_batch_processing_seconds AS
SELECT time,
       sum_seconds::double precision AS value,
       job_id,
       project,
       model
  FROM job_timings
 WHERE sum_seconds IS NOT NULL
   AND kind = 'batch';
COMMENT ON VIEW job_batch_processing_seconds IS 'aima metric view M11: Time to process one batch (s, summary)';

CREATE VIEW job_model_load_seconds AS
SELECT time,
       sum_seconds::double precision AS value,
       job_id,
       project,
       model
  FROM job_timings
 WHERE sum_seconds IS NOT NULL
   AND kind = 'model_load';
COMMENT ON VIEW job_model_load_seconds IS 'aima metric view M12: Time to load the model (s, summary)';

CREATE VIEW job_data_transfer_seconds AS
SELECT time,
       sum_seconds::double precision AS value,
       job_id,
       project,
       model,
       NULLIF(direction, '') AS direction
  FROM job_timings
 WHERE sum_seconds IS NOT NULL
   AND kind = 'data_transfer';
COMMENT ON VIEW job_data_transfer_seconds IS 'aima metric view M13: Host-device copy time (s, summary)';

CREATE VIEW job_data_transfer_bytes AS
SELECT time,
       bytes::double precision AS value,
       job_id,
       project,
       model,
       NULLIF(direction, '') AS direction
  FROM job_timings
 WHERE bytes IS NOT NULL
   AND kind = 'data_transfer';
COMMENT ON VIEW job_data_transfer_bytes IS 'aima metric view M13: Bytes copied between host and device in the interval (bytes, gauge)';

CREATE VIEW queue_length_jobs AS
SELECT time,
       length_jobs::double precision AS value,
       queue
  FROM queue_samples
 WHERE length_jobs IS NOT NULL;
COMMENT ON VIEW queue_length_jobs IS 'aima metric view M14: Jobs waiting in the queue (count, gauge)';

CREATE VIEW job_queue_wait_seconds AS
SELECT time,
       queue_wait_seconds::double precision AS value,
       queue,
       project
  FROM job_events
 WHERE queue_wait_seconds IS NOT NULL
   AND event = 'started';
COMMENT ON VIEW job_queue_wait_seconds IS 'aima metric view M15: Time from queued to started (s, gauge)';

CREATE VIEW host_cpu_utilization_percent AS
SELECT time,
       cpu_utilization_percent::double precision AS value,
       host
  FROM system_samples
 WHERE cpu_utilization_percent IS NOT NULL;
COMMENT ON VIEW host_cpu_utilization_percent IS 'aima metric view M16: CPU busy, all cores (%, gauge)';

CREATE VIEW host_memory_used_bytes AS
SELECT time,
       memory_used_bytes::double precision AS value,
       host
  FROM system_samples
 WHERE memory_used_bytes IS NOT NULL;
COMMENT ON VIEW host_memory_used_bytes IS 'aima metric view M17: Memory in use (total minus available) (bytes, gauge)';

CREATE VIEW host_disk_used_bytes AS
SELECT time,
       used_bytes::double precision AS value,
       host,
       mountpoint
  FROM system_disk_samples
 WHERE used_bytes IS NOT NULL;
COMMENT ON VIEW host_disk_used_bytes IS 'aima metric view M18: File system space in use (bytes, gauge)';

CREATE VIEW host_network_receive_bytes_per_second AS
SELECT time,
       receive_bytes_per_second::double precision AS value,
       host,
       interface
  FROM system_network_samples
 WHERE receive_bytes_per_second IS NOT NULL;
COMMENT ON VIEW host_network_receive_bytes_per_second IS 'aima metric view M19: Network receive throughput (B/s, gauge)';

CREATE VIEW host_network_transmit_bytes_per_second AS
SELECT time,
       transmit_bytes_per_second::double precision AS value,
       host,
       interface
  FROM system_network_samples
 WHERE transmit_bytes_per_second IS NOT NULL;
COMMENT ON VIEW host_network_transmit_bytes_per_second IS 'aima metric view M19: Network transmit throughput (B/s, gauge)';

CREATE VIEW host_containers_running AS
SELECT time,
       containers_running::double precision AS value,
       host
  FROM system_samples
 WHERE containers_running IS NOT NULL;
COMMENT ON VIEW host_containers_running IS 'aima metric view M20: Containers running on the host (count, gauge)';

CREATE VIEW k8s_pod_status AS
SELECT time,
       ready::integer::double precision AS value,
       namespace,
       pod,
       phase
  FROM pod_status
 WHERE ready IS NOT NULL;
COMMENT ON VIEW k8s_pod_status IS 'aima metric view M21: Pod readiness (1 ready, 0 not), labelled with the pod phase (state, gauge)';

CREATE VIEW k8s_pod_restarts AS
SELECT time,
       restarts::double precision AS value,
       namespace,
       pod
  FROM pod_status
 WHERE restarts IS NOT NULL;
COMMENT ON VIEW k8s_pod_restarts IS 'aima metric view M21: Container restarts of the pod (count, counter)';

CREATE VIEW k8s_pod_cpu_usage_cores AS
SELECT time,
       cpu_usage_cores::double precision AS value,
       namespace,
       pod
  FROM pod_status
 WHERE cpu_usage_cores IS NOT NULL;
COMMENT ON VIEW k8s_pod_cpu_usage_cores IS 'aima metric view M21: CPU the pod''s containers use (Metrics Server) (cores, gauge)';

CREATE VIEW k8s_pod_memory_usage_bytes AS
SELECT time,
       memory_usage_bytes::double precision AS value,
       namespace,
       pod
  FROM pod_status
 WHERE memory_usage_bytes IS NOT NULL;
COMMENT ON VIEW k8s_pod_memory_usage_bytes IS 'aima metric view M21: Working-set memory of the pod''s containers (Metrics Server) (bytes, gauge)';

CREATE VIEW gpu_hours AS
SELECT time,
       gpu_hours::double precision AS value,
       NULLIF(project, '') AS project,
       NULLIF(gpu_model, '') AS gpu_model
  FROM costs
 WHERE gpu_hours IS NOT NULL
   AND kind = 'gpu_hours';
COMMENT ON VIEW gpu_hours IS 'aima metric view M22: GPU time used by jobs (h, gauge)';

CREATE VIEW gpu_idle_hours AS
SELECT time,
       idle_gpu_hours::double precision AS value,
       NULLIF(gpu_model, '') AS gpu_model
  FROM costs
 WHERE idle_gpu_hours IS NOT NULL
   AND kind = 'gpu_hours';
COMMENT ON VIEW gpu_idle_hours IS 'aima metric view extra: GPU time available but used by no job (which GPUs sit idle) (h, gauge)';

CREATE VIEW cost_estimated_eur AS
SELECT time,
       cost_estimated_eur::double precision AS value,
       NULLIF(project, '') AS project,
       NULLIF(provider, '') AS provider
  FROM costs
 WHERE cost_estimated_eur IS NOT NULL
   AND kind = 'gpu_hours';
COMMENT ON VIEW cost_estimated_eur IS 'aima metric view M23: Estimated cost of the GPU time used (EUR, gauge)';

CREATE VIEW job_cost_eur AS
SELECT time,
       job_cost_eur::double precision AS value,
       NULLIF(job_id, '') AS job_id,
       NULLIF(project, '') AS project
  FROM costs
 WHERE job_cost_eur IS NOT NULL
   AND kind = 'job_cost';
COMMENT ON VIEW job_cost_eur IS 'aima metric view M24: Cost of one finished job (EUR, gauge)';

CREATE VIEW job_cost_per_media_minute_eur AS
SELECT time,
       job_cost_per_media_minute_eur::double precision AS value,
       NULLIF(job_id, '') AS job_id,
       NULLIF(project, '') AS project
  FROM costs
 WHERE job_cost_per_media_minute_eur IS NOT NULL
   AND kind = 'job_cost';
COMMENT ON VIEW job_cost_per_media_minute_eur IS 'aima metric view M25: Job cost per media minute processed (EUR/min, gauge)';

CREATE VIEW budget_utilization_percent AS
SELECT time,
       budget_utilization_percent::double precision AS value,
       NULLIF(project, '') AS project,
       NULLIF(budget, '') AS budget
  FROM costs
 WHERE budget_utilization_percent IS NOT NULL
   AND kind = 'budget';
COMMENT ON VIEW budget_utilization_percent IS 'aima metric view M26: Share of the budget spent in the period so far (%, gauge)';

CREATE VIEW budget_forecast_eur AS
SELECT time,
       forecast_eur::double precision AS value,
       NULLIF(project, '') AS project,
       NULLIF(budget, '') AS budget
  FROM costs
 WHERE forecast_eur IS NOT NULL
   AND kind = 'budget';
COMMENT ON VIEW budget_forecast_eur IS 'aima metric view extra: Cost forecast to the period''s end at the current rate (EUR, gauge)';

CREATE VIEW metrics_long AS
SELECT time, 'gpu_utilization_percent'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'gpu', gpu, 'gpu_uuid', gpu_uuid, 'gpu_model', gpu_model, 'mig_instance', mig_instance)) AS labels
  FROM gpu_utilization_percent
UNION ALL
SELECT time, 'gpu_memory_used_bytes'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'gpu', gpu, 'gpu_uuid', gpu_uuid, 'gpu_model', gpu_model, 'mig_instance', mig_instance)) AS labels
  FROM gpu_memory_used_bytes
UNION ALL
SELECT time, 'gpu_memory_utilization_percent'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'gpu', gpu, 'gpu_uuid', gpu_uuid, 'gpu_model', gpu_model, 'mig_instance', mig_instance)) AS labels
  FROM gpu_memory_utilization_percent
UNION ALL
SELECT time, 'gpu_memory_bandwidth_utilization_percent'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'gpu', gpu, 'gpu_uuid', gpu_uuid, 'gpu_model', gpu_model, 'mig_instance', mig_instance)) AS labels
  FROM gpu_memory_bandwidth_utilization_percent
UNION ALL
SELECT time, 'gpu_temperature_celsius'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'gpu', gpu, 'gpu_uuid', gpu_uuid, 'gpu_model', gpu_model, 'mig_instance', mig_instance)) AS labels
  FROM gpu_temperature_celsius
UNION ALL
SELECT time, 'gpu_power_watts'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'gpu', gpu, 'gpu_uuid', gpu_uuid, 'gpu_model', gpu_model, 'mig_instance', mig_instance)) AS labels
  FROM gpu_power_watts
UNION ALL
SELECT time, 'gpu_tensor_core_utilization_percent'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'gpu', gpu, 'gpu_uuid', gpu_uuid, 'gpu_model', gpu_model, 'mig_instance', mig_instance)) AS labels
  FROM gpu_tensor_core_utilization_percent
UNION ALL
SELECT time, 'gpu_pcie_tx_bytes_per_second'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'gpu', gpu, 'gpu_uuid', gpu_uuid, 'gpu_model', gpu_model, 'mig_instance', mig_instance)) AS labels
  FROM gpu_pcie_tx_bytes_per_second
UNION ALL
SELECT time, 'gpu_pcie_rx_bytes_per_second'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'gpu', gpu, 'gpu_uuid', gpu_uuid, 'gpu_model', gpu_model, 'mig_instance', mig_instance)) AS labels
  FROM gpu_pcie_rx_bytes_per_second
UNION ALL
SELECT time, 'gpu_energy_joules'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'gpu', gpu, 'gpu_uuid', gpu_uuid, 'gpu_model', gpu_model, 'mig_instance', mig_instance)) AS labels
  FROM gpu_energy_joules
UNION ALL
SELECT time, 'gpu_sm_clock_hz'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'gpu', gpu, 'gpu_uuid', gpu_uuid, 'gpu_model', gpu_model, 'mig_instance', mig_instance)) AS labels
  FROM gpu_sm_clock_hz
UNION ALL
SELECT time, 'gpu_memory_clock_hz'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'gpu', gpu, 'gpu_uuid', gpu_uuid, 'gpu_model', gpu_model, 'mig_instance', mig_instance)) AS labels
  FROM gpu_memory_clock_hz
UNION ALL
SELECT time, 'gpu_ecc_corrected_errors'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'gpu', gpu, 'gpu_uuid', gpu_uuid, 'gpu_model', gpu_model, 'mig_instance', mig_instance)) AS labels
  FROM gpu_ecc_corrected_errors
UNION ALL
SELECT time, 'gpu_ecc_uncorrected_errors'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'gpu', gpu, 'gpu_uuid', gpu_uuid, 'gpu_model', gpu_model, 'mig_instance', mig_instance)) AS labels
  FROM gpu_ecc_uncorrected_errors
UNION ALL
SELECT time, 'cuda_kernel_duration_seconds'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('job_id', job_id, 'kernel', kernel)) AS labels
  FROM cuda_kernel_duration_seconds
UNION ALL
SELECT time, 'job_frame_processing_seconds'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('job_id', job_id, 'project', project, 'model', model)) AS labels
  FROM job_frame_processing_seconds
UNION ALL
SELECT time, 'job_inference_seconds'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('job_id', job_id, 'project', project, 'model', model)) AS labels
  FROM job_inference_seconds
UNION ALL
SELECT time, 'job_batch_processing_seconds'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('job_id', job_id, 'project', project, 'model', model)) AS labels
  FROM job_batch_processing_seconds
UNION ALL
SELECT time, 'job_model_load_seconds'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('job_id', job_id, 'project', project, 'model', model)) AS labels
  FROM job_model_load_seconds
UNION ALL
SELECT time, 'job_data_transfer_seconds'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('job_id', job_id, 'project', project, 'model', model, 'direction', direction)) AS labels
  FROM job_data_transfer_seconds
UNION ALL
SELECT time, 'job_data_transfer_bytes'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('job_id', job_id, 'project', project, 'model', model, 'direction', direction)) AS labels
  FROM job_data_transfer_bytes
UNION ALL
SELECT time, 'queue_length_jobs'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('queue', queue)) AS labels
  FROM queue_length_jobs
UNION ALL
SELECT time, 'job_queue_wait_seconds'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('queue', queue, 'project', project)) AS labels
  FROM job_queue_wait_seconds
UNION ALL
SELECT time, 'host_cpu_utilization_percent'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host)) AS labels
  FROM host_cpu_utilization_percent
UNION ALL
SELECT time, 'host_memory_used_bytes'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host)) AS labels
  FROM host_memory_used_bytes
UNION ALL
SELECT time, 'host_disk_used_bytes'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'mountpoint', mountpoint)) AS labels
  FROM host_disk_used_bytes
UNION ALL
SELECT time, 'host_network_receive_bytes_per_second'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'interface', interface)) AS labels
  FROM host_network_receive_bytes_per_second
UNION ALL
SELECT time, 'host_network_transmit_bytes_per_second'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host, 'interface', interface)) AS labels
  FROM host_network_transmit_bytes_per_second
UNION ALL
SELECT time, 'host_containers_running'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('host', host)) AS labels
  FROM host_containers_running
UNION ALL
SELECT time, 'k8s_pod_status'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('namespace', namespace, 'pod', pod, 'phase', phase)) AS labels
  FROM k8s_pod_status
UNION ALL
SELECT time, 'k8s_pod_restarts'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('namespace', namespace, 'pod', pod)) AS labels
  FROM k8s_pod_restarts
UNION ALL
SELECT time, 'k8s_pod_cpu_usage_cores'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('namespace', namespace, 'pod', pod)) AS labels
  FROM k8s_pod_cpu_usage_cores
UNION ALL
SELECT time, 'k8s_pod_memory_usage_bytes'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('namespace', namespace, 'pod', pod)) AS labels
  FROM k8s_pod_memory_usage_bytes
UNION ALL
SELECT time, 'gpu_hours'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('project', project, 'gpu_model', gpu_model)) AS labels
  FROM gpu_hours
UNION ALL
SELECT time, 'gpu_idle_hours'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('gpu_model', gpu_model)) AS labels
  FROM gpu_idle_hours
UNION ALL
SELECT time, 'cost_estimated_eur'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('project', project, 'provider', provider)) AS labels
  FROM cost_estimated_eur
UNION ALL
SELECT time, 'job_cost_eur'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('job_id', job_id, 'project', project)) AS labels
  FROM job_cost_eur
UNION ALL
SELECT time, 'job_cost_per_media_minute_eur'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('job_id', job_id, 'project', project)) AS labels
  FROM job_cost_per_media_minute_eur
UNION ALL
SELECT time, 'budget_utilization_percent'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('project', project, 'budget', budget)) AS labels
  FROM budget_utilization_percent
UNION ALL
SELECT time, 'budget_forecast_eur'::text AS metric, value, jsonb_strip_nulls(jsonb_build_object('project', project, 'budget', budget)) AS labels
  FROM budget_forecast_eur;
COMMENT ON VIEW metrics_long IS 'aima metric views, all metrics: time, metric, value, labels';

-- Dropping a view dropped its grants: the dashboards' readers get theirs again (migration 0012).
SELECT aima_reader_grants();
