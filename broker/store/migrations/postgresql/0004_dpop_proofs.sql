-- DPoP proofs seen (RFC 9449 §11.1): each (key thumbprint, jti) is accepted once while its
-- iat window lasts, across every replica. Swept as proofs expire.
CREATE TABLE dpop_proofs (
    jkt TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (jkt, jti)
);
CREATE INDEX dpop_proofs_by_expiry ON dpop_proofs (expires);
