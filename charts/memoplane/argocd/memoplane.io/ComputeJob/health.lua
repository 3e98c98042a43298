-- Argo CD health check for memoplane.io/ComputeJob (resource.customizations.health.memoplane.io_ComputeJob).
-- It reads the kstatus conditions the operator writes (memoplane/api/conditions.py):
--   generation not yet observed -> Progressing   Stalled=True -> Degraded
--   Ready=True -> Healthy                         Reconciling=True or Ready not True -> Progressing
-- Test cases: health_test.yaml and testdata/ beside this file (run by tests/unit/test_argocd_health.py).
local hs = {}

local function condition(conditions, kind)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  if c.message ~= nil and c.message ~= "" then
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason .. ": " .. c.message
    end
    return c.message
  end
  if c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the memoplane operator"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = obj.status.conditions
local stalled = condition(conditions, "Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled, "Stalled")
  return hs
end

local ready = condition(conditions, "Ready")
local reconciling = condition(conditions, "Reconciling")
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(reconciling, "Reconciling")
  return hs
end
if ready ~= nil then
  if ready.status == "True" then
    hs.status = "Healthy"
  else
    hs.status = "Progressing"
  end
  hs.message = describe(ready, "Ready is " .. tostring(ready.status))
  return hs
end

-- status.phase is a summary for humans; it decides only when there are no conditions.
local phase = obj.status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded"
  return hs
end
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = "Failed"
  return hs
end
hs.status = "Progressing"
hs.message = "Waiting for the memoplane operator"
return hs
