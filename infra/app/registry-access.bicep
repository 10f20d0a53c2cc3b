// Read access to a private Azure ML registry. Not deployed for Microsoft's public azureml registry, whose
// models and components anyone can read.
@description('Name of the existing Azure ML registry.')
param registryName string

@description('Principal id of the app\'s user-assigned identity.')
param principalId string

// AzureML Registry User: read the registry and use its assets (models, components, environments).
var registryUserRoleId = '1823dd4f-9b8c-4ab6-ab4e-7397a3684615'

resource registry 'Microsoft.MachineLearningServices/registries@2024-04-01' existing = {
  name: registryName
}

resource registryUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(registry.id, principalId, registryUserRoleId)
  scope: registry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', registryUserRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
