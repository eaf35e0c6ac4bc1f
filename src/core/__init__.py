"""Everything that knows ServiceNow OAuth and the connection secret; nothing here sees a Lambda event."""
