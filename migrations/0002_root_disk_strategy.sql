-- How a VM's copy-on-write root disk was made: 'qcow2' (overlay), 'reflink' (clone) or
-- 'copy' (sparse copy). Chosen at create from the host's support and the config; fixed for
-- the VM's life, since it decides the disk's file and format.
ALTER TABLE vms ADD COLUMN root_disk TEXT NOT NULL DEFAULT 'qcow2';
