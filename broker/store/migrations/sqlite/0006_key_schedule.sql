-- Pre-published rotation: a key is in the JWKS from create_time, signs from activate_time,
-- stops signing at stop_signing_time and leaves the JWKS at retire_time. Keys published
-- before this migration signed from the start; those already retiring had stopped signing.
ALTER TABLE signing_keys ADD COLUMN activate_time REAL;
ALTER TABLE signing_keys ADD COLUMN stop_signing_time REAL;
UPDATE signing_keys SET activate_time = create_time;
UPDATE signing_keys SET stop_signing_time = create_time WHERE retire_time IS NOT NULL;
