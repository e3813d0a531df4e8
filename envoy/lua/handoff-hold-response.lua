function envoy_on_response(h)
  if h:headers():get("x-handoff-translated") ~= nil then
    local body = h:body()
    if body ~= nil then
      h:headers():replace("content-length", tostring(body:length()))
    end
  end
end
