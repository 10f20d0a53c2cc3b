// The app's own Event Grid topic: a CloudEvent per run state change (Tunegrid.Run.<State>, subject runs/<run id>).
// Local auth is disabled: the app publishes with its managed identity (EventGrid Data Sender, app/rbac.bicep), so
// there is no topic key to store or leak. Subscribers are added with `az eventgrid event-subscription create`
// (README, docs/run-events.md).
@description('Name of the topic.')
param name string

@description('Region of the topic.')
param location string

@description('Tags of the topic.')
param tags object = {}

// The system identity lets a subscription deliver to Azure resources (a Service Bus queue) or dead-letter without
// keys: `--delivery-identity systemassigned` once that identity has a data role on the destination (README).
resource topic 'Microsoft.EventGrid/topics@2025-02-15' = {
  name: name
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    inputSchema: 'CloudEventSchemaV1_0'
    disableLocalAuth: true
    minimumTlsVersionAllowed: '1.2'
    // checkov:skip=CKV_AZURE_193: no virtual network: the app publishes over the public endpoint, Entra ID only
    publicNetworkAccess: 'Enabled'
  }
}

output name string = topic.name
output principalId string = topic.identity.principalId
output endpoint string = topic.properties.endpoint
