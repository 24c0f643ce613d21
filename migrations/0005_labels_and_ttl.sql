-- Labels on VMs and images (a JSON object of string values, selected with json_extract),
-- and a VM's expiry: the reaper deletes it once expire_at_ms is past.
ALTER TABLE vms ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
ALTER TABLE vms ADD COLUMN expire_at_ms INTEGER;
ALTER TABLE images ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
CREATE INDEX vms_expire ON vms(expire_at_ms) WHERE expire_at_ms IS NOT NULL;
