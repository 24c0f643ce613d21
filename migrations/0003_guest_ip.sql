-- The guest's IPv4 address when the host gives VMs a network: allocated durably from the
-- bridge's CIDR at create, released with the record, never handed out twice.
ALTER TABLE vms ADD COLUMN ip TEXT;
CREATE UNIQUE INDEX vms_ip ON vms(ip) WHERE ip IS NOT NULL;
