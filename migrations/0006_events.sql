-- VM events for WatchVms: state changes, completed operation stages, deletions. The
-- revision is durable and never reused (AUTOINCREMENT), one per event, in commit order.
-- Each event keeps the VM's name and labels at that time, so watchers can filter on them
-- after the VM is gone.
CREATE TABLE events (
    revision INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id TEXT NOT NULL,
    vm_name TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    kind TEXT NOT NULL CHECK (kind IN ('state', 'stage', 'deleted')),
    state TEXT,
    previous_state TEXT,
    operation TEXT,
    op_id TEXT,
    stage TEXT,
    since_start_ms INTEGER,
    since_last_stage_ms INTEGER,
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX events_created ON events(created_at_ms);
