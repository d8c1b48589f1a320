"""From the project file's wanted state to the maps, without dropping a flow.

services    services and backends into the service and backend tables (slots allocated)
firewall    public ports and their allow/deny rules into the tries
maglev      the Maglev lookup table a service's backends are chosen from
"""
