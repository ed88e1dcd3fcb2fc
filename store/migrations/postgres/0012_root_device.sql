-- A host's root-device hint (Ironic's): which disk the deploy agent writes, by serial, WWN,
-- by-path, model, name or minimum size, in the agent's one-word form
-- (`serial=S4EWNX0N123,size>=214748364800B`). NULL: the smallest fixed disk that holds the image.
ALTER TABLE hosts ADD COLUMN root_device TEXT;
