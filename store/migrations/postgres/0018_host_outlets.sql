-- The switched PDU outlets a host hangs off (issue "Recovery when the BMC is gone": fencing
-- levels): the fence's level after the BMC turns every one of them off, confirmed. `url` is
-- the outlet (redfish+https://…/Outlets/ID or snmp://PDU/OUTLET), `credentials` a reference
-- (env:VAR or file:/path, as a BMC's), never the secret.
CREATE TABLE host_outlets (
    host TEXT NOT NULL REFERENCES hosts (name),
    url TEXT NOT NULL,
    credentials TEXT,
    PRIMARY KEY (host, url)
);
