-- Argo CD health check for every nixops.io kind (Network, Machine, Volume,
-- KeyPair, S3Bucket). They all report kstatus conditions: Ready, Reconciling,
-- Stalled (and Paused), with status.observedGeneration. Install it in
-- argocd-cm as resource.customizations.health.nixops.io_<Kind>; see the
-- chart's README.
local hs = { status = "Progressing", message = "waiting for the operator" }
if obj.status == nil then
  return hs
end
-- A paused object keeps the observedGeneration of the last spec it acted
-- on; its Paused message says whether a newer one waits.
for _, c in ipairs(obj.status.conditions or {}) do
  if c.type == "Paused" and c.status == "True" then
    return { status = "Suspended", message = c.message }
  end
end
if obj.metadata ~= nil and obj.metadata.generation ~= nil and obj.status.observedGeneration ~= obj.metadata.generation then
  hs.message = "waiting for the operator to observe generation " .. tostring(obj.metadata.generation)
  return hs
end
local ready, reconciling
for _, c in ipairs(obj.status.conditions or {}) do
  if c.type == "Stalled" and c.status == "True" then
    return { status = "Degraded", message = c.message }
  end
  if c.type == "Ready" then
    ready = c
  end
  if c.type == "Reconciling" and c.status == "True" then
    reconciling = c
  end
end
if ready ~= nil and ready.status == "True" then
  return { status = "Healthy", message = ready.message }
end
if reconciling ~= nil then
  hs.message = reconciling.message
elseif ready ~= nil then
  hs.message = ready.message
end
return hs
