-- Cancelling an operation (issue "The operator's surface": operations list, show, cancel):
-- who asked for it. Its runner ends the operation at its next step where its kind allows it
-- there (a reimage anywhere, a drain anywhere, a fence only before its point of return).
-- Keep in step with ../sqlite/0026_operation_cancel.sql.
ALTER TABLE operations ADD COLUMN cancel_requested TEXT;
