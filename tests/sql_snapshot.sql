-- claims.claim
WITH locked AS
(SELECT anon_1.id AS id, anon_1.cursor_key AS cursor_key, anon_1.priority AS priority, anon_1.scheduled_time AS scheduled_time, anon_1.created_time AS created_time, anon_1.id_1 AS id_1
FROM (SELECT by_claim.id AS id, by_claim.cursor_key AS cursor_key, by_claim.priority AS priority, by_claim.scheduled_time AS scheduled_time, by_claim.created_time AS created_time, by_claim.id AS id_1
FROM unnest(%(queues)s::TEXT[]) AS wanted(name) JOIN LATERAL (SELECT mq_job.id AS id, mq_job.cursor_key AS cursor_key, mq_job.priority AS priority, mq_job.scheduled_time AS scheduled_time, mq_job.created_time AS created_time, mq_job.id AS id__1
FROM mq_job
WHERE mq_job.state = 'pending' AND mq_job.queue = wanted.name AND mq_job.scheduled_time <= %(now)s::TIMESTAMP WITHOUT TIME ZONE AND NOT (EXISTS (SELECT *
FROM mq_job AS active
WHERE active.cursor_key = mq_job.cursor_key AND active.cursor_key IS NOT NULL AND active.state IN ('running', 'lost'))) ORDER BY mq_job.priority DESC, mq_job.scheduled_time, mq_job.created_time, mq_job.id
 LIMIT %(limit)s::INTEGER FOR UPDATE OF mq_job SKIP LOCKED) AS by_claim ON true) AS anon_1
WHERE anon_1.cursor_key IS NULL OR NOT (EXISTS (SELECT *
FROM mq_job AS earlier
WHERE earlier.cursor_key = anon_1.cursor_key AND earlier.state = 'pending' AND earlier.queue = ANY (%(queues)s::TEXT[]) AND earlier.scheduled_time <= %(now)s::TIMESTAMP WITHOUT TIME ZONE AND (earlier.scheduled_time, earlier.created_time, earlier.id) < (anon_1.scheduled_time, anon_1.created_time, anon_1.id)))),
picked AS
(SELECT candidates.id AS id
FROM (SELECT locked.id AS id, locked.cursor_key AS cursor_key, locked.priority AS priority, locked.scheduled_time AS scheduled_time, locked.created_time AS created_time, locked.id_1 AS id_1
FROM locked UNION ALL SELECT anon_2.id AS id, anon_2.cursor_key AS cursor_key, anon_2.priority AS priority, anon_2.scheduled_time AS scheduled_time, anon_2.created_time AS created_time, anon_2.id_2 AS id_2
FROM (SELECT past_refused.id AS id, past_refused.cursor_key AS cursor_key, past_refused.priority AS priority, past_refused.scheduled_time AS scheduled_time, past_refused.created_time AS created_time, past_refused.id AS id_2
FROM unnest(%(queues)s::TEXT[]) AS wanted(name) JOIN LATERAL (SELECT mq_job.id AS id, mq_job.cursor_key AS cursor_key, mq_job.priority AS priority, mq_job.scheduled_time AS scheduled_time, mq_job.created_time AS created_time, mq_job.id AS id__1
FROM mq_job
WHERE mq_job.state = 'pending' AND mq_job.queue = wanted.name AND mq_job.scheduled_time <= %(now)s::TIMESTAMP WITHOUT TIME ZONE AND NOT (EXISTS (SELECT *
FROM mq_job AS active
WHERE active.cursor_key = mq_job.cursor_key AND active.cursor_key IS NOT NULL AND active.state IN ('running', 'lost'))) AND NOT (EXISTS (SELECT locked.id
FROM locked)) AND (mq_job.cursor_key IS NULL OR NOT (EXISTS (SELECT *
FROM mq_job AS earlier
WHERE earlier.cursor_key = mq_job.cursor_key AND earlier.state = 'pending' AND earlier.queue = ANY (%(queues)s::TEXT[]) AND earlier.scheduled_time <= %(now)s::TIMESTAMP WITHOUT TIME ZONE AND (earlier.scheduled_time, earlier.created_time, earlier.id) < (mq_job.scheduled_time, mq_job.created_time, mq_job.id)))) ORDER BY mq_job.priority DESC, mq_job.scheduled_time, mq_job.created_time, mq_job.id
 LIMIT %(limit)s::INTEGER FOR UPDATE OF mq_job SKIP LOCKED) AS past_refused ON true) AS anon_2) AS candidates ORDER BY candidates.priority DESC, candidates.scheduled_time, candidates.created_time, candidates.id
 LIMIT %(limit)s::INTEGER)
 UPDATE mq_job SET start_time=%(now)s::TIMESTAMP WITHOUT TIME ZONE, state='running', cursor_snapshot=(SELECT mq_job_cursor.properties
FROM mq_job_cursor
WHERE mq_job_cursor.key = mq_job.cursor_key), lock_id=%(lock_id)s::INTEGER, worker=%(name)s::VARCHAR WHERE mq_job.id = ANY (CAST((SELECT array_agg(picked.id) AS array_agg_1
FROM picked) AS BIGINT[])) RETURNING mq_job.id, mq_job.queue, mq_job.method, mq_job.args, mq_job.cursor_key, mq_job.cursor_snapshot, mq_job.trace, mq_job.scheduled_time, mq_job.created_time;

-- claims.next_due
SELECT min(first_due.scheduled_time) AS min_1
FROM unnest(%(queues)s::TEXT[]) AS wanted(name) JOIN LATERAL (SELECT mq_job.scheduled_time AS scheduled_time
FROM mq_job
WHERE mq_job.state = 'pending' AND mq_job.queue = wanted.name AND NOT (EXISTS (SELECT *
FROM mq_job AS active
WHERE active.cursor_key = mq_job.cursor_key AND active.cursor_key IS NOT NULL AND active.state IN ('running', 'lost'))) ORDER BY mq_job.scheduled_time, mq_job.created_time, mq_job.id
 LIMIT %(param_1)s::INTEGER) AS first_due ON true;

-- claims.adopt
UPDATE mq_job SET end_time=%(end_time)s::TIMESTAMP WITHOUT TIME ZONE, state='running', lock_id=%(lock_id)s::INTEGER WHERE mq_job.state IN ('running', 'lost') AND mq_job.worker = %(name)s::VARCHAR AND mq_job.start_time = ANY (%(stamps)s::TIMESTAMP WITHOUT TIME ZONE[]) AND mq_job.queue = ANY (%(queues)s::TEXT[]) AND mq_job.id != ALL (%(known)s::BIGINT[]) RETURNING mq_job.id, mq_job.queue, mq_job.method, mq_job.args, mq_job.cursor_key, mq_job.cursor_snapshot, mq_job.trace, mq_job.scheduled_time, mq_job.created_time;

-- claims.try_lock
SELECT pg_try_advisory_lock(%(lock_key)s::INTEGER, %(lock_id)s::INTEGER) AS pg_try_advisory_lock_1;

-- claims.whoami
SELECT pg_backend_pid() AS pid, current_database() AS database;

-- claims.lock_holders
SELECT pg_locks.pid, pg_database.datname AS database
FROM pg_locks LEFT OUTER JOIN pg_database ON pg_database.oid = pg_locks.database
WHERE pg_locks.locktype = %(locktype_1)s::VARCHAR AND pg_locks.classid = %(lock_key)s::INTEGER AND pg_locks.objid = %(lock_id)s::INTEGER AND pg_locks.objsubid = %(objsubid_1)s::INTEGER AND pg_locks.granted;

-- enqueue.enqueue
INSERT INTO mq_job (state, args, trace) VALUES ('pending', CAST(%(args_json)s::VARCHAR AS JSONB), CAST(%(trace_json)s::VARCHAR AS JSONB)) ON CONFLICT (cursor_key, queue, method) WHERE state = 'pending' AND collapsible = true DO NOTHING RETURNING mq_job.id, mq_job.scheduled_time;

-- enqueue.enqueue_many
INSERT INTO mq_job (state, created_time, scheduled_time, queue, method, cursor_key, collapsible, args, trace) SELECT 'pending', batch.created, batch.scheduled, batch.queue, batch.method, batch.cursor_key, false AS anon_1, CAST(batch.args AS JSONB) AS args, CAST(batch.trace AS JSONB) AS trace
FROM unnest(%(created)s::TIMESTAMP WITHOUT TIME ZONE[], %(scheduled)s::TIMESTAMP WITHOUT TIME ZONE[], %(queues)s::TEXT[], %(methods)s::TEXT[], %(cursor_keys)s::TEXT[], %(args)s::TEXT[], %(traces)s::TEXT[]) WITH ORDINALITY AS batch(created, scheduled, queue, method, cursor_key, args, trace, n) ORDER BY batch.n RETURNING mq_job.id, mq_job.scheduled_time;

-- enqueue.enqueue_many_prioritized
INSERT INTO mq_job (state, created_time, scheduled_time, queue, method, cursor_key, collapsible, args, trace, priority) SELECT 'pending', batch.created, batch.scheduled, batch.queue, batch.method, batch.cursor_key, false AS anon_1, CAST(batch.args AS JSONB) AS args, CAST(batch.trace AS JSONB) AS trace, batch.priority
FROM unnest(%(created)s::TIMESTAMP WITHOUT TIME ZONE[], %(scheduled)s::TIMESTAMP WITHOUT TIME ZONE[], %(queues)s::TEXT[], %(methods)s::TEXT[], %(cursor_keys)s::TEXT[], %(args)s::TEXT[], %(traces)s::TEXT[], %(priorities)s::SMALLINT[]) WITH ORDINALITY AS batch(created, scheduled, queue, method, cursor_key, args, trace, priority, n) ORDER BY batch.n RETURNING mq_job.id, mq_job.scheduled_time;

-- enqueue.join
SELECT mq_job.id, mq_job.start_time, mq_job.end_time, mq_job.state, mq_job.created_time, mq_job.scheduled_time, mq_job.queue, mq_job.method, mq_job.args, mq_job.result, mq_job.cursor_key, mq_job.cursor_snapshot, mq_job.collapsible, mq_job.trace, mq_job.lock_id, mq_job.worker, mq_job.priority
FROM mq_job
WHERE mq_job.state = 'pending' AND mq_job.queue = %(queue)s::VARCHAR AND mq_job.method = %(method)s::VARCHAR AND mq_job.cursor_key = %(cursor_key)s::VARCHAR AND mq_job.collapsible = true
 LIMIT %(param_1)s::INTEGER FOR UPDATE;

-- enqueue.link_schedules
INSERT INTO mq_job_schedule_link (job_id, schedule_id) VALUES (%(job_id)s::BIGINT, %(schedule_id)s::BIGINT) ON CONFLICT DO NOTHING;

-- enqueue.link_listeners
INSERT INTO mq_job_listener_link (job_id, listener_id) VALUES (%(job_id)s::BIGINT, %(listener_id)s::BIGINT) ON CONFLICT DO NOTHING;

-- enqueue.notify
SELECT pg_notify(%(channel)s::VARCHAR, %(payload)s::VARCHAR) AS pg_notify_1;

-- outcomes.finish
UPDATE mq_job SET end_time=%(now)s::TIMESTAMP WITHOUT TIME ZONE, state=%(state)s, result=CAST(%(result_json)s::VARCHAR AS JSONB), lock_id=%(lock_id)s::INTEGER WHERE mq_job.id = %(job_id)s::BIGINT AND mq_job.state IN ('running', 'lost') RETURNING mq_job.id, mq_job.queue, mq_job.method, mq_job.start_time, mq_job.end_time, EXISTS (SELECT *
FROM mq_job_listener
WHERE mq_job_listener.event = (%(param_1)s::VARCHAR || CAST(mq_job.state AS TEXT) || %(param_2)s::VARCHAR || mq_job.queue || %(param_3)s::VARCHAR || mq_job.method) AND mq_job_listener.is_enabled = true) AS has_listeners;

-- outcomes.finish_many
WITH recorded AS
(UPDATE mq_job SET end_time=%(now)s::TIMESTAMP WITHOUT TIME ZONE, state=CAST(done.state AS mq_job_state), result=CAST(done.result AS JSONB), lock_id=%(param_2)s::INTEGER FROM unnest(%(ids)s::BIGINT[], %(states)s::TEXT[], %(results)s::TEXT[]) AS done(id, state, result) WHERE mq_job.id = done.id AND mq_job.id = ANY (%(ids)s::BIGINT[]) AND CAST(mq_job.state AS TEXT) IN ('running', 'lost') RETURNING mq_job.id, mq_job.queue, mq_job.method, mq_job.start_time, mq_job.end_time, EXISTS (SELECT *
FROM mq_job_listener
WHERE mq_job_listener.event = (%(param_3)s::VARCHAR || CAST(mq_job.state AS TEXT) || %(param_4)s::VARCHAR || mq_job.queue || %(param_5)s::VARCHAR || mq_job.method) AND mq_job_listener.is_enabled = true) AS has_listeners, mq_job.cursor_key, mq_job.state)
 SELECT recorded.id, recorded.queue, recorded.method, recorded.start_time, recorded.end_time, recorded.has_listeners, recorded.cursor_key, recorded.state, pg_notify(%(param_1)s::VARCHAR, CAST(json_build_object(%(json_build_object_1)s::VARCHAR, recorded.id, %(json_build_object_2)s::VARCHAR, CAST(recorded.state AS TEXT)) AS TEXT)) AS notified
FROM recorded;

-- outcomes.finish_quiet
WITH recorded AS
(UPDATE mq_job SET end_time=%(now)s::TIMESTAMP WITHOUT TIME ZONE, state=CAST(done.state AS mq_job_state), result=CAST(done.result AS JSONB), lock_id=%(param_1)s::INTEGER FROM unnest(%(ids)s::BIGINT[], %(states)s::TEXT[], %(results)s::TEXT[], %(cursors)s::TEXT[]) AS done(id, state, result, cursor) WHERE mq_job.id = done.id AND mq_job.id = ANY (%(ids)s::BIGINT[]) AND CAST(mq_job.state AS TEXT) IN ('running', 'lost') AND NOT (EXISTS (SELECT *
FROM mq_job_listener
WHERE mq_job_listener.event = (%(param_2)s::VARCHAR || CAST(done.state AS TEXT) || %(param_3)s::VARCHAR || mq_job.queue || %(param_4)s::VARCHAR || mq_job.method) AND mq_job_listener.is_enabled = true)) RETURNING mq_job.id, mq_job.state, mq_job.cursor_key, done.cursor),
saved AS
(INSERT INTO mq_job_cursor (key, properties, updated_job_id) SELECT recorded.cursor_key AS cursor_key, CAST(recorded.cursor AS JSONB) AS cursor, recorded.id AS id
FROM recorded
WHERE recorded.cursor IS NOT NULL AND recorded.cursor_key IS NOT NULL ON CONFLICT (key) DO UPDATE SET properties = excluded.properties, updated_job_id = excluded.updated_job_id WHERE mq_job_cursor.properties IS DISTINCT FROM excluded.properties),
hinted AS
(SELECT pg_notify(%(param_6)s::VARCHAR || successor.queue, CAST(json_build_object(%(json_build_object_3)s::VARCHAR, successor.id, %(json_build_object_4)s::VARCHAR, CAST(floor(EXTRACT(epoch FROM successor.scheduled_time)) AS BIGINT)) AS TEXT)) AS hint
FROM (SELECT mq_job.queue AS queue, min(mq_job.id) AS id, min(mq_job.scheduled_time) AS scheduled_time
FROM mq_job
WHERE mq_job.state = 'pending' AND mq_job.cursor_key = ANY (array((SELECT recorded.cursor_key
FROM recorded
WHERE recorded.cursor_key IS NOT NULL))) GROUP BY mq_job.queue) AS successor)
 SELECT recorded.id, pg_notify(%(param_5)s::VARCHAR, CAST(json_build_object(%(json_build_object_1)s::VARCHAR, recorded.id, %(json_build_object_2)s::VARCHAR, CAST(recorded.state AS TEXT)) AS TEXT)) AS notified, (SELECT count(*) AS count_1
FROM hinted) AS hints
FROM recorded;

-- outcomes.save_cursors
INSERT INTO mq_job_cursor (key, properties, updated_job_id) SELECT saved.key, CAST(saved.properties AS JSONB) AS properties, saved.job_id
FROM unnest(%(keys)s::TEXT[], %(properties)s::TEXT[], %(job_ids)s::BIGINT[]) AS saved(key, properties, job_id) ON CONFLICT (key) DO UPDATE SET properties = excluded.properties, updated_job_id = excluded.updated_job_id WHERE mq_job_cursor.properties IS DISTINCT FROM excluded.properties;

-- outcomes.save_cursor
INSERT INTO mq_job_cursor (key, properties, updated_job_id) VALUES (%(key)s::VARCHAR, CAST(%(properties_json)s::VARCHAR AS JSONB), %(job_id)s::BIGINT) ON CONFLICT (key) DO UPDATE SET properties = excluded.properties, updated_job_id = excluded.updated_job_id WHERE mq_job_cursor.properties IS DISTINCT FROM excluded.properties;

-- outcomes.notify_successors
SELECT pg_notify(%(param_1)s::VARCHAR || successor.queue, CAST(json_build_object(%(json_build_object_1)s::VARCHAR, successor.id, %(json_build_object_2)s::VARCHAR, CAST(floor(EXTRACT(epoch FROM successor.scheduled_time)) AS BIGINT)) AS TEXT)) AS hint
FROM (SELECT mq_job.queue AS queue, min(mq_job.id) AS id, min(mq_job.scheduled_time) AS scheduled_time
FROM mq_job
WHERE mq_job.state = 'pending' AND mq_job.cursor_key = ANY (%(keys)s::TEXT[]) GROUP BY mq_job.queue) AS successor;

-- outcomes.requeue
UPDATE mq_job SET start_time=%(start_time)s::TIMESTAMP WITHOUT TIME ZONE, end_time=%(end_time)s::TIMESTAMP WITHOUT TIME ZONE, state='pending', cursor_snapshot=NULL, collapsible=CASE WHEN (EXISTS (SELECT *
FROM mq_job AS twin
WHERE twin.state = 'pending' AND twin.collapsible = true AND twin.cursor_key = mq_job.cursor_key AND twin.queue = mq_job.queue AND twin.method = mq_job.method)) THEN false ELSE mq_job.collapsible END, lock_id=%(lock_id)s::INTEGER, worker=%(worker)s::VARCHAR WHERE mq_job.id = %(job_id)s::BIGINT AND mq_job.state IN ('running', 'lost') RETURNING mq_job.id;

-- outcomes.retry_many
WITH retried AS
(INSERT INTO mq_job (state, created_time, scheduled_time, queue, method, args, cursor_key, collapsible, trace, priority) SELECT 'pending', %(now)s::TIMESTAMP WITHOUT TIME ZONE AS anon_1, wanted.scheduled AS scheduled, failed.queue AS queue, failed.method AS method, failed.args AS args, failed.cursor_key AS cursor_key, false AS anon_2, (CASE WHEN (jsonb_typeof(failed.trace) = %(jsonb_typeof_2)s::VARCHAR) THEN failed.trace ELSE CAST(%(param_4)s::VARCHAR AS JSONB) END - %(param_5)s::VARCHAR) || jsonb_build_object(%(param_6)s::VARCHAR, failed.id, %(param_7)s::VARCHAR, wanted.attempt) AS anon_3, failed.priority AS priority
FROM unnest(%(ids)s::BIGINT[], %(scheduled)s::TIMESTAMP WITHOUT TIME ZONE[], %(attempts)s::INTEGER[]) AS wanted(id, scheduled, attempt) JOIN mq_job AS failed ON failed.id = wanted.id ORDER BY wanted.id RETURNING mq_job.id, mq_job.queue, mq_job.scheduled_time, CAST(mq_job.trace ->> %(trace_1)s::TEXT AS BIGINT) AS source_id),
marked AS
(UPDATE mq_job SET trace=(CASE WHEN (jsonb_typeof(mq_job.trace) = %(jsonb_typeof_1)s::VARCHAR) THEN mq_job.trace ELSE CAST(%(param_2)s::VARCHAR AS JSONB) END || jsonb_build_object(%(param_3)s::VARCHAR, retried.id)) FROM retried WHERE mq_job.id = retried.source_id RETURNING mq_job.id)
 SELECT retried.id, retried.source_id, pg_notify(%(param_1)s::VARCHAR || retried.queue, concat(%(concat_1)s::VARCHAR, retried.id, %(concat_2)s::VARCHAR, CAST(floor(EXTRACT(epoch FROM retried.scheduled_time)) AS BIGINT), %(concat_3)s::VARCHAR)) AS notified, (SELECT count(*) AS count_1
FROM marked) AS marked
FROM retried;

-- outcomes.mark_one_lost
UPDATE mq_job SET end_time=%(now)s::TIMESTAMP WITHOUT TIME ZONE, state='lost', lock_id=%(lock_id)s::INTEGER WHERE mq_job.id = %(job_id)s::BIGINT AND mq_job.state = 'running' RETURNING mq_job.id, mq_job.queue, mq_job.method, mq_job.start_time, mq_job.end_time, EXISTS (SELECT *
FROM mq_job_listener
WHERE mq_job_listener.event = (%(param_1)s::VARCHAR || CAST(mq_job.state AS TEXT) || %(param_2)s::VARCHAR || mq_job.queue || %(param_3)s::VARCHAR || mq_job.method) AND mq_job_listener.is_enabled = true) AS has_listeners;

-- maintenance.mark_lost
UPDATE mq_job SET end_time=%(now)s::TIMESTAMP WITHOUT TIME ZONE, state='lost', lock_id=%(lock_id)s::INTEGER WHERE mq_job.id IN (SELECT mq_job.id
FROM mq_job
WHERE mq_job.state = 'running' AND mq_job.queue = ANY (%(queues)s::TEXT[]) AND NOT (EXISTS (SELECT *
FROM pg_locks
WHERE pg_locks.locktype = %(locktype_1)s::VARCHAR AND pg_locks.database = (SELECT pg_database.oid
FROM pg_database
WHERE pg_database.datname = current_database()) AND pg_locks.classid = %(lock_key)s::INTEGER AND mq_job.lock_id = pg_locks.objid AND pg_locks.objsubid = %(objsubid_1)s::INTEGER)) FOR UPDATE SKIP LOCKED) AND mq_job.state = 'running' RETURNING mq_job.id, mq_job.queue, mq_job.method, mq_job.cursor_key, mq_job.worker, mq_job.start_time, mq_job.end_time, EXISTS (SELECT *
FROM mq_job_listener
WHERE mq_job_listener.event = (%(param_1)s::VARCHAR || CAST(mq_job.state AS TEXT) || %(param_2)s::VARCHAR || mq_job.queue || %(param_3)s::VARCHAR || mq_job.method) AND mq_job_listener.is_enabled = true) AS has_listeners;

-- maintenance.release_stale_locks
DELETE FROM mq_lock WHERE NOT (EXISTS (SELECT *
FROM pg_locks
WHERE pg_locks.locktype = %(locktype_1)s::VARCHAR AND pg_locks.database = (SELECT pg_database.oid
FROM pg_database
WHERE pg_database.datname = current_database()) AND pg_locks.classid = %(lock_key)s::INTEGER AND mq_lock.lock_id = pg_locks.objid AND pg_locks.objsubid = %(objsubid_1)s::INTEGER)) RETURNING mq_lock.ns, mq_lock.key, mq_lock.lock_id, mq_lock.worker;

-- maintenance.release_my_locks
DELETE FROM mq_lock WHERE mq_lock.lock_id = %(lock_id)s::INTEGER;

-- maintenance.restamp
UPDATE mq_job SET end_time=%(end_time)s::TIMESTAMP WITHOUT TIME ZONE, state='running', lock_id=%(lock_id)s::INTEGER, worker=%(name)s::VARCHAR WHERE mq_job.id = ANY (%(ids)s::BIGINT[]) AND mq_job.state IN ('running', 'lost') RETURNING mq_job.id;

-- maintenance.move_locks
UPDATE mq_lock SET lock_id=%(lock_id)s::INTEGER WHERE mq_lock.lock_id = %(old_lock_id)s::INTEGER;

-- maintenance.server_uptime
SELECT EXTRACT(epoch FROM now() - pg_postmaster_start_time()) AS uptime;

-- maintenance.resolvable_lost
SELECT mq_job.id, mq_job.queue, mq_job.method, mq_job.cursor_key, mq_job.trace, mq_job.worker, mq_job.start_time, mq_job.end_time, EXISTS (SELECT *
FROM aiomq_abort_request
WHERE aiomq_abort_request.job_id = mq_job.id) AS aborted
FROM mq_job
WHERE mq_job.state = 'lost' AND mq_job.queue = ANY (%(queues)s::TEXT[]) AND mq_job.end_time <= %(before)s::TIMESTAMP WITHOUT TIME ZONE AND (jsonb_typeof(mq_job.trace) = %(jsonb_typeof_1)s::VARCHAR AND (mq_job.trace ? %(trace_1)s::VARCHAR) OR mq_job.queue = ANY (%(policy_queues)s::TEXT[]) OR (EXISTS (SELECT *
FROM aiomq_abort_request
WHERE aiomq_abort_request.job_id = mq_job.id))) ORDER BY mq_job.end_time, mq_job.id
 LIMIT %(param_1)s::INTEGER FOR UPDATE OF mq_job SKIP LOCKED;

-- maintenance.resolve_lost
UPDATE mq_job SET state=%(state)s, result=CAST(%(result_json)s::VARCHAR AS JSONB) WHERE mq_job.id = %(job_id)s::BIGINT AND mq_job.state = 'lost' RETURNING mq_job.id, mq_job.queue, mq_job.method, mq_job.start_time, mq_job.end_time, EXISTS (SELECT *
FROM mq_job_listener
WHERE mq_job_listener.event = (%(param_1)s::VARCHAR || CAST(mq_job.state AS TEXT) || %(param_2)s::VARCHAR || mq_job.queue || %(param_3)s::VARCHAR || mq_job.method) AND mq_job_listener.is_enabled = true) AS has_listeners;

-- maintenance.keepalive
SELECT 1;

-- schedules.take_ownership
INSERT INTO mq_lock (ns, key, lock_id, worker) SELECT %(param_1)s::VARCHAR AS ns, unnest(%(queues)s::TEXT[]) AS key, %(lock_id)s::INTEGER AS lock_id, %(name)s::VARCHAR AS worker ON CONFLICT (ns, key) DO NOTHING;

-- schedules.owned
SELECT mq_lock.key
FROM mq_lock
WHERE mq_lock.ns = %(param_1)s::VARCHAR AND mq_lock.lock_id = %(lock_id)s::INTEGER;

-- schedules.stale
SELECT mq_job_schedule.id, mq_job_schedule.created_time, mq_job_schedule.is_enabled, mq_job_schedule.rrule, mq_job_schedule.queue, mq_job_schedule.method, mq_job_schedule.args, mq_job_schedule.cursor_key, mq_job_schedule.collapse_on_cursor, mq_job_schedule.next_execution_time
FROM mq_job_schedule
WHERE mq_job_schedule.queue = ANY (%(queues)s::TEXT[]) AND mq_job_schedule.is_enabled = true AND mq_job_schedule.next_execution_time < %(before)s::TIMESTAMP WITHOUT TIME ZONE FOR UPDATE SKIP LOCKED;

-- schedules.due
SELECT mq_job_schedule.id, mq_job_schedule.next_execution_time
FROM mq_job_schedule
WHERE mq_job_schedule.queue = ANY (%(queues)s::TEXT[]) AND mq_job_schedule.is_enabled = true AND mq_job_schedule.next_execution_time <= %(now)s::TIMESTAMP WITHOUT TIME ZONE ORDER BY mq_job_schedule.next_execution_time, mq_job_schedule.created_time, mq_job_schedule.id FOR UPDATE SKIP LOCKED;

-- schedules.next_time
SELECT min(mq_job_schedule.next_execution_time) AS min_1
FROM mq_job_schedule
WHERE mq_job_schedule.queue = ANY (%(queues)s::TEXT[]) AND mq_job_schedule.is_enabled = true;

-- schedules.set_next
UPDATE mq_job_schedule SET next_execution_time=%(next_time)s::TIMESTAMP WITHOUT TIME ZONE WHERE mq_job_schedule.id = %(schedule_id)s::BIGINT;

-- lookups.job_info
SELECT mq_job.id, mq_job.queue, mq_job.method, mq_job.args, mq_job.state, mq_job.result, mq_job.cursor_key, mq_job.created_time, mq_job.scheduled_time, mq_job.start_time, mq_job.end_time, mq_job.worker, mq_job.trace
FROM mq_job
WHERE mq_job.id = %(job_id)s::BIGINT;

-- lookups.jobs_info
SELECT mq_job.id AS id, mq_job.queue AS queue, mq_job.method AS method, mq_job.args AS args, mq_job.state AS state, mq_job.result AS result, mq_job.cursor_key AS cursor_key, mq_job.created_time AS created_time, mq_job.scheduled_time AS scheduled_time, mq_job.start_time AS start_time, mq_job.end_time AS end_time, mq_job.worker AS worker, mq_job.trace AS trace
FROM mq_job
WHERE mq_job.id = ANY (%(job_ids)s::BIGINT[]);

-- lookups.cursor_properties
SELECT mq_job_cursor.properties
FROM mq_job_cursor
WHERE mq_job_cursor.key = %(key)s::VARCHAR;

-- lookups.listeners_of
SELECT mq_job_listener.id, mq_job_listener.created_time, mq_job_listener.is_enabled, mq_job_listener.event, mq_job_listener.queue, mq_job_listener.method, mq_job_listener.args, mq_job_listener.context_arg_key, mq_job_listener."when", mq_job_listener.cursor_key, mq_job_listener.collapse_on_cursor
FROM mq_job_listener
WHERE mq_job_listener.event = %(event)s::VARCHAR AND mq_job_listener.is_enabled = true ORDER BY mq_job_listener.id;

-- aborts.request
INSERT INTO aiomq_abort_request (job_id, requested_time) VALUES (%(job_id)s::BIGINT, %(now)s::TIMESTAMP WITHOUT TIME ZONE) ON CONFLICT (job_id) DO NOTHING;

-- aborts.requested_among
SELECT aiomq_abort_request.job_id
FROM aiomq_abort_request
WHERE aiomq_abort_request.job_id = ANY (%(ids)s::BIGINT[]);

-- aborts.purge
DELETE FROM aiomq_abort_request USING mq_job WHERE aiomq_abort_request.job_id = mq_job.id AND (mq_job.state NOT IN ('running', 'lost'));

-- enqueue.enqueue_notify(call)
WITH queued AS
(INSERT INTO mq_job (state, created_time, scheduled_time, queue, method, args, cursor_key, collapsible, trace) VALUES ('pending', %(created_time)s::TIMESTAMP WITHOUT TIME ZONE, %(scheduled_time)s::TIMESTAMP WITHOUT TIME ZONE, %(queue)s::VARCHAR, %(method)s::VARCHAR, CAST(%(args_json)s::VARCHAR AS JSONB), %(cursor_key)s::VARCHAR, %(collapsible)s, CAST(%(trace_json)s::VARCHAR AS JSONB)) ON CONFLICT (cursor_key, queue, method) WHERE state = 'pending' AND collapsible = true DO NOTHING RETURNING mq_job.id, mq_job.scheduled_time)
 SELECT queued.id, queued.scheduled_time, pg_notify(%(channel)s::VARCHAR, concat(%(concat_1)s::VARCHAR, queued.id, %(concat_2)s::VARCHAR, %(t)s::BIGINT, %(concat_3)s::VARCHAR)) AS notified
FROM queued;

-- enqueue.enqueue_notify(call, worker)
WITH queued AS
(INSERT INTO mq_job (state, created_time, scheduled_time, queue, method, args, cursor_key, collapsible, trace, worker) VALUES ('pending', %(created_time)s::TIMESTAMP WITHOUT TIME ZONE, %(scheduled_time)s::TIMESTAMP WITHOUT TIME ZONE, %(queue)s::VARCHAR, %(method)s::VARCHAR, CAST(%(args_json)s::VARCHAR AS JSONB), %(cursor_key)s::VARCHAR, %(collapsible)s, CAST(%(trace_json)s::VARCHAR AS JSONB), %(worker)s::VARCHAR) ON CONFLICT (cursor_key, queue, method) WHERE state = 'pending' AND collapsible = true DO NOTHING RETURNING mq_job.id, mq_job.scheduled_time)
 SELECT queued.id, queued.scheduled_time, pg_notify(%(channel)s::VARCHAR, concat(%(concat_1)s::VARCHAR, queued.id, %(concat_2)s::VARCHAR, %(t)s::BIGINT, %(concat_3)s::VARCHAR)) AS notified
FROM queued;

-- lookups.find_jobs(none)
SELECT mq_job.id, mq_job.queue, mq_job.method, mq_job.args, mq_job.state, mq_job.result, mq_job.cursor_key, mq_job.created_time, mq_job.scheduled_time, mq_job.start_time, mq_job.end_time, mq_job.worker, mq_job.trace
FROM mq_job ORDER BY mq_job.created_time DESC, mq_job.id DESC
 LIMIT %(limit)s::INTEGER;

-- lookups.find_jobs(all)
SELECT mq_job.id, mq_job.queue, mq_job.method, mq_job.args, mq_job.state, mq_job.result, mq_job.cursor_key, mq_job.created_time, mq_job.scheduled_time, mq_job.start_time, mq_job.end_time, mq_job.worker, mq_job.trace
FROM mq_job
WHERE mq_job.queue = %(queue)s::VARCHAR AND mq_job.method = %(method)s::VARCHAR AND mq_job.state = %(state)s AND mq_job.cursor_key = %(cursor_key)s::VARCHAR ORDER BY mq_job.created_time DESC, mq_job.id DESC
 LIMIT %(limit)s::INTEGER;
