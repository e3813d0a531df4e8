function envoy_on_request(h)
  if h:headers():get("x-handoff-hold") ~= nil then
    h:headers():remove("x-handoff-hold")
    local body = h:body()
    if body ~= nil then
      h:headers():replace("content-length", tostring(body:length()))
    end
  end
end
