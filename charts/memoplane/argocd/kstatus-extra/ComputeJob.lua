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
