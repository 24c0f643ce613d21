-- Why a VM's last operation failed, as a code (vm_exited, interrupted, start_failed,
-- create_leftovers); '' when there is no error. `last_error` keeps saying it in words.
ALTER TABLE vms ADD COLUMN last_error_reason TEXT NOT NULL DEFAULT '';
