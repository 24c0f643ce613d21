-- A snapshot taken of a guest without an agent: nothing in the guest was synced or told,
-- and VMs started from it are not told their identity either (they keep their source's).
ALTER TABLE snapshots ADD COLUMN without_agent INTEGER NOT NULL DEFAULT 0;
